"""Test support: real PostgreSQL databases and real `gpux serve` processes (never mocks)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from exchange.core.net import free_port, wait_healthy, with_database  # noqa: F401 (re-exported for tests)

ADMIN_KEY = "gpx_test_admin_key_0123456789abcdefghijklmnop"
# The test suite's receivers listen on loopback, which webhooks refuse unless allowed; and names are
# looked up in the hosts file only, so no test makes the exchange send a query off this machine.
WEBHOOK_TEST_ENV = {"GPUX_WEBHOOK_ALLOWED_NETS": "127.0.0.0/8,::1/128", "GPUX_WEBHOOK_RESOLVE": "hosts"}


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
    """Signal a process and wait for it; kill it if it does not go in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@dataclass
class ServerProcess:
    """A `gpux serve` subprocess on a free port."""
    base_url: str
    proc: subprocess.Popen
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        stop_process(self.proc, sig, timeout)


def start_server(tmp: Path, *, database_url: str | None, home: Path | None = None, workers: int = 1,
                 extra_env: dict[str, str] | None = None, port: int | None = None,
                 admin_key: str | None = ADMIN_KEY, ready_timeout: float = 90) -> ServerProcess:
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "GPUX_ADMIN_KEY")}
    env.update({"GPUX_HOME": str(home or tmp / "home"), "GPUX_TICK_S": "0.5", "GPUX_LOG_LEVEL": "WARNING",
                "PYTHONUNBUFFERED": "1", **WEBHOOK_TEST_ENV})
    if admin_key:
        env["GPUX_ADMIN_KEY"] = admin_key
    if database_url:
        env["DATABASE_URL"] = database_url
    env.update(extra_env or {})
    tmp.mkdir(parents=True, exist_ok=True)
    log_path = tmp / f"server-{port}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "exchange.cli", "serve", "--port", str(port),
                                 "--workers", str(workers)], env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    server = ServerProcess(base_url=f"http://127.0.0.1:{port}", proc=proc, log_path=log_path, env=env)
    try:
        wait_healthy(server.base_url, proc, ready_timeout, server.log)
    except RuntimeError:
        server.stop()
        raise
    return server


def run_audit(database_url: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DATABASE_URL=database_url)
    return subprocess.run([sys.executable, "-m", "exchange.cli", "audit"], env=env, capture_output=True, text=True,
                          timeout=120)


@dataclass
class AgentProcess:
    """A `gpux agent --simulate` subprocess."""
    proc: subprocess.Popen
    log_path: Path
    data_dir: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> None:
        stop_process(self.proc, sig, timeout)


def start_agent(tmp: Path, base_url: str, token: str, *, host: str, simulate: str = "8xH100-80GB",
                policy: Path | None = None, sample_interval: float = 0.2, batch: float = 1.0,
                extra_args: tuple[str, ...] = ()) -> AgentProcess:
    data_dir = tmp / f"agent-{host}"
    data_dir.mkdir(parents=True, exist_ok=True)
    log_path = tmp / f"agent-{host}.log"
    args = [sys.executable, "-m", "exchange.cli", "agent", "--exchange", base_url, "--token", token,
            "--simulate", simulate, "--host", host, "--data-dir", str(data_dir),
            "--sample-interval", str(sample_interval), "--batch", str(batch)]
    if policy is not None:
        args += ["--policy", str(policy)]
    args += extra_args
    env = dict(os.environ, PYTHONUNBUFFERED="1", GPUX_LOG_LEVEL="INFO")
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    return AgentProcess(proc=proc, log_path=log_path, data_dir=data_dir)


def postgres_pids(pgdata: Path) -> list[int]:
    """The PostgreSQL processes running on the data folder `pgdata`. The postmaster and its children
    chdir into it (pg_ctl passes the folder in the environment, so no command line names it)."""
    pgdata = Path(pgdata).resolve()
    found = []
    for proc in psutil.process_iter(["name"]):
        try:
            if proc.info["name"] == "postgres" and Path(proc.cwd()) == pgdata:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def processes_using(folder: Path) -> list[str]:
    """Processes other than this one that run in, name, or have GPUX_HOME inside `folder` (servers,
    agents, PostgreSQL): `pid name cmdline` for each, for an assertion message."""
    folder = str(Path(folder).resolve())
    found = []
    for proc in psutil.process_iter(["pid", "name", "cmdline"]):
        if proc.pid == os.getpid():
            continue
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            home = proc.environ().get("GPUX_HOME", "")
            if (folder in cmdline or proc.cwd().startswith(folder)
                    or (home and str(Path(home).resolve()).startswith(folder))):
                found.append(f"{proc.pid} {proc.info['name']} {cmdline}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found
