"""`gpux`: serve, agent, demo, audit, sim, bench, watch; and the tenant's, owner's and admin's
commands over the Python client (exchange/commands)."""
from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click

from exchange.core.settings import Settings


class _Gpux(click.Group):
    """The `gpux` group. A usage error (a missing option, a bad value) under `--json` is also
    written as the error object on stdout, so a program reading stdout always gets JSON."""

    def main(self, args: list[str] | None = None, **extra: object) -> None:  # type: ignore[override]
        args = list(sys.argv[1:] if args is None else args)
        extra.pop("standalone_mode", None)
        try:
            code = super().main(args, standalone_mode=False, **extra)
        except click.ClickException as exc:
            exc.show()
            if "--json" in args:
                import json

                click.echo(json.dumps({"error": {"code": "usage", "message": exc.format_message()}}, indent=2))
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(cls=_Gpux)
def main() -> None:
    """gpu-exchange: a spot market for spare GPU time.

    Tenants: login, markets, book, quote, bid, bids, cancel, leases, cost, balance, ledger, events,
    watch. Owners: hosts, host, offers, offer, reclaim, reclaims, earnings, agent. Admin: account,
    deposit. Every API command takes --json (one JSON document) and --profile."""


def _database_url(settings: Settings):
    """(url, embedded server or None): DATABASE_URL, else the embedded server under GPUX_HOME."""
    if settings.database_url:
        return settings.database_url, None
    from exchange.db.embedded import start_embedded

    server, url = start_embedded(settings.home)
    return url, server


class _Stopped(BaseException):
    """SIGTERM or SIGINT reached `gpux serve` (raised by its handler, caught around uvicorn)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _StopSignals:
    """SIGTERM/SIGINT raise _Stopped, except while `deferred` (PostgreSQL starting or stopping), when
    the first one is kept and raised as soon as that step is over. Not the signal mask: pg_ctl and
    PostgreSQL would inherit it."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.deferred = False
        self.pending: int | None = None
        for signum in self.SIGNALS:
            signal.signal(signum, self.handle)

    def handle(self, signum: int, _frame: object) -> None:
        if self.deferred:
            self.pending = self.pending or signum
            return
        raise _Stopped(signum)

    @contextmanager
    def deferring(self) -> Iterator[None]:
        self.deferred = True
        try:
            yield
        finally:
            self.deferred = False
        if self.pending is not None:
            raise _Stopped(self.pending)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="server processes")
@click.option("--home", type=click.Path(path_type=Path), default=None, help="data folder (GPUX_HOME)")
def serve(host: str, port: int, workers: int, home: Path | None) -> None:
    """API + websocket feed + auction ticks + settlement. Embedded PostgreSQL unless DATABASE_URL."""
    import uvicorn

    from exchange.core.logs import configure_logging
    from exchange.db.embedded import HomeInUse, lock_home, stop_embedded

    if home is not None:
        os.environ["GPUX_HOME"] = str(home)
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    if not settings.database_url:
        # One server per embedded data folder, held until this process ends (however it ends). With
        # DATABASE_URL, several servers on one database are a cluster: no lock.
        try:
            _home_lock = lock_home(settings.home, f"http://{host}:{port}")  # noqa: F841 (held open)
        except HomeInUse as in_use:
            raise click.ClickException(str(in_use)) from None
    # The embedded server belongs to this process and must stop with it. uvicorn shuts down
    # gracefully on SIGTERM/SIGINT and then raises the signal again with our handler back in place:
    # it raises _Stopped, the `finally` stops PostgreSQL, and the signal is re-delivered at the end
    # (the exit status a supervisor expects). With --workers N uvicorn's supervisor returns instead.
    signals = _StopSignals()
    server = None
    received = None
    try:
        with signals.deferring():  # so that `server` is known when a signal lands
            url, server = _database_url(settings)
        # Worker processes read the same settings from the environment.
        os.environ["DATABASE_URL"] = url
        uvicorn.run("exchange.app:create_app", factory=True, host=host, port=port, workers=workers,
                    log_config=None, lifespan="on", ws=os.environ.get("GPUX_WS_IMPL", "auto"))
    except _Stopped as stopped:
        received = stopped.signum
    finally:
        if server is not None:
            signals.deferred = True  # a second ^C must not cut pg_ctl stop short
            stop_embedded(server, force=True)
    if received is not None:
        signal.signal(received, signal.SIG_DFL)
        signal.raise_signal(received)


@main.command()
@click.option("--exchange", "exchange_url", required=True, help="the exchange's base URL, e.g. http://127.0.0.1:8000")
@click.option("--token", required=True, envvar="GPUX_AGENT_TOKEN", help="this host's agent token")
@click.option("--simulate", default=None, help="simulated GPUs, e.g. 8xH100-80GB (default: real GPUs via NVML)")
@click.option("--policy", "policy_path", type=click.Path(exists=True, dir_okay=False), default=None,
              help="the owner's policy file (TOML): prices, windows, hooks")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None, help="spool and state folder")
@click.option("--host", default=None, help="host name for the data dir and simulated GPU UUIDs")
@click.option("--sample-interval", default=1.0, show_default=True, type=float, help="seconds between samples")
@click.option("--batch", default=5.0, show_default=True, type=float, help="seconds of samples per report")
@click.option("--seed", default=0, show_default=True, type=int, help="seed of the simulated readings")
@click.option("--metrics-port", default=0, show_default=True, envvar="GPUX_AGENT_METRICS_PORT",
              type=click.IntRange(0, 65535),
              help="serve DCGM-style Prometheus metrics on 127.0.0.1:PORT/metrics (0: off)")
@click.option("--metadata-port", default=None, type=click.IntRange(0, 65535),
              help="serve lease notices on http://127.0.0.1:PORT (0: any free port; default: not served)")
def agent(exchange_url: str, token: str, simulate: str | None, policy_path: str | None, data_dir: str | None,
          host: str | None, sample_interval: float, batch: float, seed: int, metrics_port: int,
          metadata_port: int | None) -> None:
    """The host agent: reports GPUs, publishes offers, runs lease hooks, meters through NVML."""
    from agents.runner import run_agent
    from exchange.core.logs import configure_logging

    configure_logging(os.environ.get("GPUX_LOG_LEVEL", "INFO"))
    asyncio.run(run_agent(exchange_url, token, simulate=simulate, policy_path=policy_path, data_dir=data_dir,
                          sample_interval_s=sample_interval, batch_s=batch, host=host, seed=seed,
                          metrics_port=metrics_port or None, metadata_port=metadata_port))


@main.command()
@click.option("--seconds", default=60.0, show_default=True, type=float, help="how long the market runs")
@click.option("--port", default=None, type=int, help="the exchange's port (default: a free one)")
@click.option("--home", default=None, help="data folder (default: a new temporary one)")
@click.option("--seed", default=1, show_default=True, type=int)
def demo(seconds: float, port: int | None, home: str | None, seed: int) -> None:
    """The whole market on the embedded database: server, simulated hosts with reclaims, bidding
    tenants, a live ticker, the web page's URL, and a ledger audit at the end."""
    from exchange.demo import main as run_demo

    sys.exit(run_demo(seconds, port, home, seed))


@main.command()
def audit() -> None:
    """Check the exchange's invariants (ledger, leases, hosts, bids) against the database at its
    clock now, with this environment's settlement and host settings; exit 1 on any breach."""
    import asyncpg

    from exchange.ledger.audit import format_report, run_audit

    settings = Settings.from_env()
    url, server = _database_url(settings)

    async def check() -> list:
        conn = await asyncpg.connect(url)
        try:
            return await run_audit(conn, close_after_s=settings.settle_close_after_s, settle_s=settings.settle_s,
                                   host_grace_s=settings.host_grace_s)
        finally:
            await conn.close()

    try:
        breaches = asyncio.run(check())
    finally:
        if server is not None:
            from exchange.db.embedded import stop_embedded

            stop_embedded(server)  # stops it unless a running `gpux serve` owns it
    click.echo(format_report(breaches))
    sys.exit(1 if breaches else 0)


@main.command()
@click.option("--seed", default=1, show_default=True, type=int, help="the first seed")
@click.option("--steps", default=200, show_default=True, type=int, help="workload steps per seed (after its setup)")
@click.option("--seeds", default=1, show_default=True, type=int, help="how many consecutive seeds, from --seed")
@click.option("--verbose", is_flag=True, help="print every step of every seed")
@click.option("-x", "--stop-on-failure", is_flag=True, help="stop at the first failing seed")
@click.option("--crash-rate", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="the share of ticks, settlement runs and meter reports crashed mid-way (then restarted)")
def sim(seed: int, steps: int, seeds: int, verbose: bool, stop_on_failure: bool, crash_rate: float) -> None:
    """Deterministic simulation: seeded tenants, owners, agents and faults against the real services,
    every invariant checked after every step. Each seed runs in a new database (DATABASE_URL's
    server, else the embedded one); a failing seed keeps it. Exit 1 on any failure."""
    from exchange.sim.runner import run_seeds

    url, server = _database_url(Settings.from_env())
    try:
        results = asyncio.run(run_seeds(url, seed, steps, seeds, click.echo, verbose=verbose,
                                        stop_on_failure=stop_on_failure, crash_rate=crash_rate))
    finally:
        if server is not None:
            from exchange.db.embedded import stop_embedded

            stop_embedded(server)
    sys.exit(0 if all(r.ok for r in results) else 1)


def _run_bench(module: str, as_json: bool, **options: object) -> None:
    """Run loadtests/<module>.py's `run(**options)`; print its table, or its figures as one JSON object."""
    import importlib
    import json

    driver = importlib.import_module(f"loadtests.{module}")
    figures = driver.run(**options)
    click.echo(json.dumps(figures) if as_json else driver.format_table(figures))


@main.group()
def bench() -> None:
    """Benchmarks: figures and ratios against a baseline run side by side (README, Benchmarks)."""


@bench.command("matching")
@click.option("--orders", default=1_000_000, show_default=True, type=int)
@click.option("--hosts", default=100_000, show_default=True, type=int)
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="print the figures as one JSON object")
def bench_matching(orders: int, hosts: int, seed: int, as_json: bool) -> None:
    """A tick over a seeded book against the plain-Python reference and an exact MILP optimum."""
    _run_bench("bench_matching", as_json, orders=orders, hosts=hosts, seed=seed)


@bench.command("settlement")
@click.option("--leases", default=10_000, show_default=True, type=int)
@click.option("--samples", default=100_000, show_default=True, type=int)
@click.option("--seed", default=1, show_default=True, type=int)
@click.option("--json", "as_json", is_flag=True, help="print the figures as one JSON object")
def bench_settlement(leases: int, samples: int, seed: int, as_json: bool) -> None:
    """Leases settled/s and samples ingested/s, against the raw COPY rate of the same PostgreSQL."""
    _run_bench("bench_settlement", as_json, leases=leases, samples=samples, seed=seed)


@bench.command("feed")
@click.option("--subscribers", default=1000, show_default=True, type=int)
@click.option("--ticks", default=10, show_default=True, type=int)
@click.option("--tick-s", default=2.0, show_default=True, type=float, help="seconds between ticks (the auction rate)")
@click.option("--workers", default=1, show_default=True, type=int, help="server processes sharing the subscribers")
@click.option("--json", "as_json", is_flag=True, help="print the figures as one JSON object")
def bench_feed(subscribers: int, ticks: int, tick_s: float, workers: int, as_json: bool) -> None:
    """Websocket subscribers on a local server: tick-to-client latency against a bare websocket echo."""
    _run_bench("bench_feed", as_json, subscribers=subscribers, ticks=ticks, tick_s=tick_s, workers=workers)


@main.command()
@click.argument("market")
@click.option("--url", default=None,
              help="the exchange's base URL (default: GPUX_URL, the profile's, else http://127.0.0.1:8000)")
@click.option("--profile", envvar="GPUX_PROFILE", default=None, help="take the URL from this profile")
@click.option("--once", is_flag=True, help="print one view once the snapshots are in, then exit")
@click.option("--seconds", type=float, default=None, help="stop after this long")
@click.option("--no-color", is_flag=True)
@click.option("--json", "as_json", is_flag=True, help="each feed message as one JSON line (JSON Lines)")
def watch(market: str, url: str | None, profile: str | None, once: bool, seconds: float | None, no_color: bool,
          as_json: bool) -> None:
    """A live terminal view of MARKET (e.g. H100-80GB/spot): price, depth, trades, from /v1/feed."""
    from exchange.commands.profile import ProfileError, config_path, load_config, resolve
    from exchange.watch import watch as run_watch

    if url is None:
        try:
            url = resolve(load_config(config_path()), profile).url
        except ProfileError as missing:
            if profile is not None:
                raise click.UsageError(str(missing)) from None
            url = "http://127.0.0.1:8000"  # the public feed needs no key: a local server by default
    try:
        code = asyncio.run(run_watch(url, market, once=once, seconds=seconds, color=not no_color,
                                     as_json=as_json))
    except KeyboardInterrupt:
        code = 0
    sys.exit(code)


@bench.command("api")
@click.option("--users", default=32, show_default=True, type=int, help="locust users (one tenant each)")
@click.option("--seconds", default=20.0, show_default=True, type=float)
@click.option("--workers", default=1, show_default=True, type=int, help="server processes")
@click.option("--json", "as_json", is_flag=True, help="print the figures as one JSON object")
def bench_api(users: int, seconds: float, workers: int, as_json: bool) -> None:
    """Durable bids/s and p50/p99 latency under locust, against the raw durable insert rate."""
    _run_bench("bench_api", as_json, users=users, seconds=seconds, workers=workers)


def _add_client_commands() -> None:
    from exchange.commands import all_commands

    for command in all_commands():
        main.add_command(command)


_add_client_commands()

if __name__ == "__main__":
    main()
