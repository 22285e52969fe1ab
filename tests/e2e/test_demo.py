"""`gpux demo` runs the whole market on the embedded database and ends with a clean audit."""
from __future__ import annotations

import os
import subprocess
import sys

from tests.support import postgres_pids, processes_using


def test_demo_runs_trades_and_passes_the_audit(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "GPUX_ADMIN_KEY")}

    done = subprocess.run([sys.executable, "-m", "exchange.cli", "demo", "--seconds", "14", "--home",
                           str(tmp_path / "demo")], env=env, capture_output=True, text=True, timeout=240)

    assert done.returncode == 0, done.stdout + done.stderr
    assert "Web page: http://127.0.0.1:" in done.stdout
    assert "ledger audit passed" in done.stdout
    prices = [line.split()[2] for line in done.stdout.splitlines() if "H100-80GB/spot" in line]
    assert prices and any(p != "-" for p in prices), done.stdout
    hooks = (tmp_path / "demo" / "logs" / "hooks.log")
    assert hooks.exists() and "start " in hooks.read_text()
    # Nothing is left running: no server, agent or PostgreSQL (the audit's included).
    assert processes_using(tmp_path / "demo") == []
    assert postgres_pids(tmp_path / "demo" / "pgdata") == []
