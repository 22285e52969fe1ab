"""`gpux bench api`: durable bids per second and their latency under locust, against the raw
single-row durable insert rate of the same PostgreSQL at the same concurrency (the floor every bid
must pay: one committed row), measured side by side in one run.

A throwaway database on the same server (DATABASE_URL, or the embedded one under GPUX_HOME) gets a
real `gpux serve`, a host with an offer (so the market exists and ticks run), and one funded tenant
per locust user; locust runs headless for a bounded time in its own process (it patches the
interpreter with gevent).
"""
from __future__ import annotations

import asyncio
import csv
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import asyncpg
import httpx

from exchange.core.settings import Settings
from exchange.core.net import free_port, wait_healthy, with_database


async def _raw_insert_rate(url: str, concurrency: int, seconds: float) -> float:
    """Single-row INSERTs, each its own committed transaction, from `concurrency` connections."""
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TABLE raw_bids (id bigserial PRIMARY KEY, account_id bigint, market text, gpus int,"
                       " duration_s int, limit_price bigint, client_order_id text, created_at timestamptz)")
    await conn.close()
    done = 0

    async def worker(n: int) -> None:
        nonlocal done
        c = await asyncpg.connect(url)
        deadline = time.perf_counter() + seconds
        i = 0
        while time.perf_counter() < deadline:
            await c.execute("INSERT INTO raw_bids (account_id, market, gpus, duration_s, limit_price, client_order_id,"
                            " created_at) VALUES ($1, 'H100-80GB/spot', 1, 3600, 1000000, $2, now())", n, f"{n}-{i}")
            i += 1
        done += i
        await c.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return done / (time.perf_counter() - started)


async def _prepare(base: str, admin_key: str, users: int) -> list[str]:
    async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30) as http:
        owner = (await http.post("/v1/accounts", json={"name": "bench-owner", "role": "owner"})).json()
        o = {"Authorization": f"Bearer {owner['api_key']}"}
        host = (await http.post("/v1/hosts", json={"name": "bench-h1"}, headers=o)).json()
        a = {"Authorization": f"Bearer {host['agent_token']}"}
        await http.put("/v1/agent/inventory", headers=a, json={"gpus": [
            {"uuid": f"GPU-bench-{i:04d}", "model": "H100-80GB", "memory_mb": 81559} for i in range(8)]})
        keys = []
        for i in range(users):
            tenant = (await http.post("/v1/accounts", json={"name": f"bench-t{i}", "role": "tenant"})).json()
            await http.post(f"/v1/accounts/{tenant['id']}/deposits",
                            json={"amount": "1000000000.00", "idempotency_key": "bench"})
            keys.append(tenant["api_key"])
        return keys


def _server_env(url: str, admin_key: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()}
    env.update({"DATABASE_URL": url, "GPUX_ADMIN_KEY": admin_key, "GPUX_RATE_LIMIT_PER_S": "100000",
                "GPUX_LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1"})
    return env


def run(users: int = 32, seconds: float = 20, workers: int = 1, database_url: str | None = None) -> dict:
    if shutil.which("locust") is None and not Path(sys.executable).with_name("locust").exists():
        raise SystemExit("gpux bench api needs locust: pip install -e '.[test]'")
    locust = shutil.which("locust") or str(Path(sys.executable).with_name("locust"))
    url = database_url or os.environ.get("DATABASE_URL")
    server = None
    if not url:
        from exchange.db.embedded import start_embedded

        server, url = start_embedded(Settings.from_env().home)
    name = f"gpux_bench_api_{os.getpid()}"
    admin_key = "gpx_bench_" + secrets.token_urlsafe(16)
    tmp = Path(tempfile.mkdtemp(prefix="gpux-bench-api-"))
    proc = None

    async def database(action: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            if action == "create":
                await conn.execute(f"CREATE DATABASE {name}")
        finally:
            await conn.close()

    try:
        asyncio.run(database("create"))
        bench_url = with_database(url, name)
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        with open(tmp / "server.log", "ab") as log:
            proc = subprocess.Popen([sys.executable, "-m", "exchange.cli", "serve", "--port", str(port), "--workers",
                                     str(workers)], env=_server_env(bench_url, admin_key), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        wait_healthy(base, proc, 120, lambda: (tmp / "server.log").read_text()[-2000:])
        keys = asyncio.run(_prepare(base, admin_key, users))
        (tmp / "keys").write_text("\n".join(keys))
        env = dict(os.environ, GPUX_BENCH_KEYS=str(tmp / "keys"))
        subprocess.run([locust, "-f", str(Path(__file__).with_name("locustfile.py")), "--headless", "-u", str(users),
                        "-r", str(users), "-t", f"{int(seconds)}s", "--host", base, "--csv", str(tmp / "stats"),
                        "--only-summary", "--stop-timeout", "5", "--loglevel", "WARNING"],
                       env=env, check=False, capture_output=True, timeout=seconds + 120)
        stats = _read_stats(tmp / "stats_stats.csv")
        durable = asyncio.run(_count_bids(bench_url))
        raw = asyncio.run(_raw_insert_rate(bench_url, users, min(seconds, 10)))
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            proc.wait(20)
        asyncio.run(database("drop"))
        if server is not None:
            from exchange.db.embedded import stop_embedded

            stop_embedded(server)
    bids_per_s = durable / stats["elapsed_s"] if stats["elapsed_s"] else 0.0
    return {"users": users, "workers": workers, "seconds": seconds, "bids": durable,
            "bids_per_s": round(bids_per_s, 1), "p50_ms": stats["p50_ms"], "p99_ms": stats["p99_ms"],
            "failures": stats["failures"], "raw_inserts_per_s": round(raw, 1),
            "api_vs_raw": round(bids_per_s / raw, 3) if raw else None}


async def _count_bids(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval("SELECT count(*) FROM bids")
    finally:
        await conn.close()


def _read_stats(path: Path) -> dict:
    with open(path) as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    row = rows.get("POST /v1/bids") or rows["Aggregated"]
    requests = int(row["Request Count"])
    rps = float(row["Requests/s"])
    return {"p50_ms": float(row["50%"]), "p99_ms": float(row["99%"]), "failures": int(row["Failure Count"]),
            "elapsed_s": requests / rps if rps else 0.0}


def format_table(f: dict) -> str:
    return "\n".join([
        f"gpux bench api — {f['users']} locust users, {f['seconds']:.0f} s, {f['workers']} server process(es)",
        f"{'measure':<40}{'value':>14}",
        f"{'durable bids / s (201, committed)':<40}{f['bids_per_s']:>14,.0f}",
        f"{'bid latency p50 / p99 (ms)':<40}{f['p50_ms']:>7.0f} / {f['p99_ms']:<5.0f}",
        f"{'failures':<40}{f['failures']:>14}",
        f"{'baseline: raw durable inserts / s':<40}{f['raw_inserts_per_s']:>14,.0f}",
        f"{'API bids as a share of raw inserts':<40}{f['api_vs_raw']:>14.1%}",
    ])
