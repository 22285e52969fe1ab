"""`gpux serve` owns its embedded PostgreSQL: SIGTERM and SIGINT (what systemd, docker, Kubernetes
and a terminal send) stop it, a second server on the same GPUX_HOME is refused with a clear message,
a SIGKILLed server's data folder is taken over by the next start. `gpux demo` leaves nothing
running. Real processes throughout; "left running" is read from the process table."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import httpx
import psutil
import pytest

from tests.e2e.client import Api
from tests.support import ADMIN_KEY, free_port, postgres_pids, processes_using, start_server


@pytest.fixture(autouse=True)
def _no_leftovers(tmp_path):
    """Whatever a failing test (or the old code) left running under its folder goes with it."""
    yield
    for line in processes_using(tmp_path):
        try:
            psutil.Process(int(line.split()[0])).kill()
        except psutil.NoSuchProcess:
            pass
    for pgdata in tmp_path.glob("*/pgdata"):
        for pid in postgres_pids(pgdata):
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


@pytest.mark.parametrize(("sig", "workers"), [(signal.SIGTERM, 1), (signal.SIGINT, 1), (signal.SIGTERM, 2)],
                         ids=["SIGTERM", "SIGINT", "SIGTERM-2-workers"])
def test_a_signal_to_serve_stops_its_embedded_postgres(tmp_path, sig, workers) -> None:
    home = tmp_path / "home"
    server = start_server(tmp_path, database_url=None, home=home, workers=workers)
    running = postgres_pids(home / "pgdata")
    assert running, "the embedded PostgreSQL should run under the home's pgdata"

    server.stop(sig)

    # The server ended on its own, not by the test's kill: by the signal itself, re-raised after its
    # cleanup (one process), or with 0 from uvicorn's supervisor (--workers N).
    assert server.proc.returncode == (-sig if workers == 1 else 0), server.log()
    assert postgres_pids(home / "pgdata") == [], server.log()
    assert not (home / "pgdata" / "postmaster.pid").exists()


def test_a_second_serve_on_the_same_home_is_refused_and_the_first_keeps_working(tmp_path) -> None:
    home = tmp_path / "home"
    first = start_server(tmp_path, database_url=None, home=home)
    try:
        postmaster = int((home / "pgdata" / "postmaster.pid").read_text().split()[0])
        port = free_port()
        env = dict(first.env)
        second = subprocess.Popen([sys.executable, "-m", "exchange.cli", "serve", "--port", str(port)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = second.communicate(timeout=120)
        except subprocess.TimeoutExpired:  # the old code: it adopted the first one's PostgreSQL and serves
            second.kill()
            output, _ = second.communicate()
            pytest.fail(f"a second gpux serve on the same GPUX_HOME kept running:\n{output}")

        assert second.returncode == 1, output
        assert "already running" in output and str(home.resolve()) in output, output
        assert f"pid {first.proc.pid}" in output and "Traceback" not in output, output
        # The first server and its PostgreSQL are untouched.
        assert postmaster in postgres_pids(home / "pgdata")
        assert httpx.get(first.base_url + "/v1/accounts/me", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
                         ).status_code == 200
    finally:
        first.stop()
    assert postgres_pids(home / "pgdata") == []


async def test_after_sigkill_the_next_serve_takes_over_the_data_folder_and_stops_it(tmp_path) -> None:
    home = tmp_path / "home"
    pgdata = home / "pgdata"
    first = start_server(tmp_path, database_url=None, home=home)
    async with Api(first.base_url, ADMIN_KEY) as admin:
        tenant = await admin.new_account("tenant", deposit="10.00")
    # A SIGKILL leaves the orphaned PostgreSQL running (nothing can stop it) ...
    first.stop(signal.SIGKILL)
    assert postgres_pids(pgdata)

    # ... the next start on the home adopts it, and stops it when it is itself stopped.
    second = start_server(tmp_path, database_url=None, home=home)
    async with Api(second.base_url, ADMIN_KEY) as admin:
        assert (await admin.as_key(tenant.key).ok("GET", "/v1/accounts/me/balance"))["available"] == "10.00"
    second.stop()
    assert postgres_pids(pgdata) == [], second.log()


async def test_a_stale_postmaster_pid_naming_another_process_does_not_stop_the_start(tmp_path) -> None:
    home = tmp_path / "home"
    pgdata = home / "pgdata"
    first = start_server(tmp_path, database_url=None, home=home)
    async with Api(first.base_url, ADMIN_KEY) as admin:
        tenant = await admin.new_account("tenant", deposit="10.00")
    # Server and PostgreSQL die together (power loss, a container killed): postmaster.pid stays, and
    # after a reboot its pid may be any other process's -- here a live `sleep`.
    first.stop(signal.SIGKILL)
    postgres = [psutil.Process(pid) for pid in postgres_pids(pgdata)]
    for proc in postgres:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()  # a backend may already have gone by itself, its postmaster killed just before
    psutil.wait_procs(postgres, timeout=60)
    stranger = subprocess.Popen(["sleep", "600"])
    try:
        for lock_file in [pgdata / "postmaster.pid", *pgdata.glob(".s.PGSQL.*.lock")]:
            lines = lock_file.read_text().split("\n")
            lock_file.write_text("\n".join([str(stranger.pid), *lines[1:]]))

        second = start_server(tmp_path, database_url=None, home=home)
        try:
            async with Api(second.base_url, ADMIN_KEY) as admin:
                balance = await admin.as_key(tenant.key).ok("GET", "/v1/accounts/me/balance")
            assert balance["available"] == "10.00"  # PostgreSQL recovered the folder after the crash
        finally:
            second.stop()
        assert stranger.poll() is None  # the stranger was left alone
        assert postgres_pids(pgdata) == []
    finally:
        stranger.kill()
        stranger.wait()


def test_sigterm_to_demo_stops_its_server_agents_and_postgres(tmp_path) -> None:
    home = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "GPUX_ADMIN_KEY")}
    demo = subprocess.Popen([sys.executable, "-m", "exchange.cli", "demo", "--seconds", "600", "--home", str(home)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        seen = []
        for line in demo.stdout:  # the market is up once the web page's address is printed
            seen.append(line)
            if "Web page:" in line:
                break
        assert processes_using(home), "".join(seen)

        demo.send_signal(signal.SIGTERM)
        rest, _ = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            demo.kill()
            demo.wait()

    assert demo.returncode == 128 + signal.SIGTERM, "".join(seen) + rest
    assert processes_using(home) == []
    assert postgres_pids(home / "pgdata") == []
