"""`gpux`: serve, agent, demo, audit, bench, watch."""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import click

from exchange.core.settings import Settings


@click.group()
def main() -> None:
    """gpu-exchange: a spot market for spare GPU time."""


def _database_url(settings: Settings):
    """(url, embedded server or None): DATABASE_URL, else the embedded server under GPUX_HOME."""
    if settings.database_url:
        return settings.database_url, None
    from exchange.db.embedded import start_embedded

    server, url = start_embedded(settings.home)
    return url, server


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8000, show_default=True, type=int)
@click.option("--workers", default=1, show_default=True, type=int, help="server processes")
@click.option("--home", type=click.Path(path_type=Path), default=None, help="data folder (GPUX_HOME)")
def serve(host: str, port: int, workers: int, home: Path | None) -> None:
    """API + websocket feed + auction ticks + settlement. Embedded PostgreSQL unless DATABASE_URL."""
    import uvicorn

    from exchange.core.logs import configure_logging

    if home is not None:
        os.environ["GPUX_HOME"] = str(home)
    settings = Settings.from_env()
    configure_logging(settings.log_level)
    url, server = _database_url(settings)
    # Worker processes read the same settings from the environment; the embedded server belongs to
    # this parent process and stops when it exits.
    os.environ["DATABASE_URL"] = url
    try:
        uvicorn.run("exchange.app:create_app", factory=True, host=host, port=port, workers=workers,
                    log_config=None, lifespan="on")
    finally:
        if server is not None:
            from exchange.db.embedded import stop_embedded

            stop_embedded(server)


@main.command()
def audit() -> None:
    """Check the ledger's invariants against the database; exit 1 on any breach."""
    import asyncpg

    from exchange.ledger.audit import format_report, run_audit

    url, server = _database_url(Settings.from_env())

    async def check() -> list:
        conn = await asyncpg.connect(url)
        try:
            return await run_audit(conn)
        finally:
            await conn.close()

    breaches = asyncio.run(check())
    click.echo(format_report(breaches))
    sys.exit(1 if breaches else 0)


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
    import json

    from loadtests.bench_matching import format_table, run

    figures = run(orders=orders, hosts=hosts, seed=seed)
    click.echo(json.dumps(figures) if as_json else format_table(figures))


if __name__ == "__main__":
    main()
