"""`gpux demo`: the whole market working on the embedded database, in one command.

It starts `gpux serve` and several `gpux agent --simulate` hosts (each with its own owner policy),
funds a few tenants that bid in both tiers, lets an owner reclaim GPUs now and then, prints a live
ticker in the terminal and the URL of the web page, and at the end checks the ledger (`gpux audit`).
Everything goes through the public HTTP API, exactly as users' programs would.
"""
from __future__ import annotations

import asyncio
import os
import random
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import httpx
from exchange.core.net import free_port, wait_healthy
from exchange.leases.lifecycle import is_preemption

HOSTS = [("h100-a1", "pod-a", "2.00", 0), ("h100-a2", "pod-a", "2.20", 3600), ("h100-b1", "pod-b", "1.80", 0),
         ("h100-b2", "pod-b", "2.40", 7200)]


@dataclass
class Procs:
    server: subprocess.Popen | None = None
    agents: list[subprocess.Popen] | None = None

    def stop(self) -> None:
        for proc in [*(self.agents or []), self.server]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*(self.agents or []), self.server]:
            if proc is not None:
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _rfc3339(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


class Client:
    def __init__(self, base: str, key: str) -> None:
        self.http = httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=30)

    async def call(self, method: str, path: str, **kwargs) -> dict | list:
        response = await self.http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text}")
        return response.json()


async def run_demo(seconds: float, port: int | None, home: Path, seed: int, out=print) -> int:
    rng = random.Random(seed)
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    admin_key = "gpx_demo_" + secrets.token_urlsafe(24)
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env.update({"GPUX_HOME": str(home), "GPUX_ADMIN_KEY": admin_key, "GPUX_TICK_S": "1", "GPUX_SETTLE_S": "5",
                "GPUX_SETTLE_CLOSE_AFTER_S": "5", "GPUX_MIN_DURATION_S": "20", "GPUX_LOG_LEVEL": "WARNING",
                "GPUX_FEE_BPS": "150", "PYTHONUNBUFFERED": "1"})
    # A demo's webhook receivers run on this machine: loopback allowed unless the caller says otherwise.
    env.setdefault("GPUX_WEBHOOK_ALLOWED_NETS", "127.0.0.0/8,::1/128")
    logs = home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    procs = Procs(agents=[])
    # The server and agents run in their own sessions (a ^C in the terminal reaches only the demo),
    # so the demo must stop them itself: SIGINT cancels this task (asyncio.run), SIGTERM too.
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
    out(f"starting the exchange on the embedded PostgreSQL under {home} …")
    with open(logs / "server.log", "ab") as log:
        procs.server = subprocess.Popen([sys.executable, "-m", "exchange.cli", "serve", "--port", str(port)],
                                        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await asyncio.to_thread(wait_healthy, base, procs.server)
        admin = Client(base, admin_key)
        owner_acc = await admin.call("POST", "/v1/accounts", json={"name": f"owner-{seed}-{port}", "role": "owner"})
        owner = Client(base, owner_acc["api_key"])
        hosts = []
        for name, fabric, floor, firm_s in HOSTS:
            host = await owner.call("POST", "/v1/hosts", json={"name": name, "fabric": fabric})
            policy = home / f"policy-{name}.toml"
            policy.write_text(f'floor_price = "{floor}"\nfirm_window_s = {firm_s}\nreclaim_notice_s = 15\n'
                              f'reclaim_rate_per_h = {rng.choice([0.02, 0.1, 0.3])}\noffer_horizon_s = 7200\n'
                              f'on_lease_start = "echo start $GPUX_LEASE_ID $GPUX_GPU_UUIDS >> {logs}/hooks.log"\n'
                              f'on_lease_end = "echo end $GPUX_LEASE_ID >> {logs}/hooks.log"\n')
            with open(logs / f"agent-{name}.log", "ab") as log:
                procs.agents.append(subprocess.Popen(
                    [sys.executable, "-m", "exchange.cli", "agent", "--exchange", base, "--token", host["agent_token"],
                     "--simulate", "8xH100-80GB", "--policy", str(policy), "--host", f"{name}-{port}",
                     "--data-dir", str(home / f"agent-{name}"), "--batch", "2"],
                    env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
            hosts.append(host)
        tenants = []
        for i in range(3):
            acc = await admin.call("POST", "/v1/accounts", json={"name": f"tenant-{i}-{seed}-{port}", "role": "tenant"})
            await admin.call("POST", f"/v1/accounts/{acc['id']}/deposits",
                             json={"amount": "5000.00", "idempotency_key": f"demo-{i}"})
            tenants.append(Client(base, acc["api_key"]))
        # The markets exist once the agents have reported their GPUs; bid only when offers are live.
        deadline = time.monotonic() + 60
        while len((await owner.call("GET", "/v1/offers", params={"status": "live"}))["items"]) < len(HOSTS):
            if time.monotonic() > deadline:
                raise RuntimeError("the simulated hosts did not publish their offers")
            await asyncio.sleep(0.3)
        out(f"4 simulated hosts (32 × H100-80GB), 3 tenants. Web page: {base}/   API docs: {base}/schema")
        out(f"{'time':>5}  {'market':<16}{'last':>8}{'indic.':>8}{'leases':>8}{'preempted':>10}")
        started = time.monotonic()
        next_bid = next_print = next_reclaim = 0.0
        reclaims: list[tuple[float, int]] = []
        orders = 0
        while (elapsed := time.monotonic() - started) < seconds:
            if elapsed >= next_bid:
                tenant = rng.choice(tenants)
                tier = rng.choice(["spot", "spot", "firm"])
                body = {"market": f"H100-80GB/{tier}", "gpus": rng.choice([1, 1, 2, 4, 8, 12]),
                        "duration_s": rng.choice([20, 30, 60, 120]),
                        "limit_price": f"{rng.uniform(1.7, 3.2):.2f}", "client_order_id": f"o{orders}",
                        "requeue_on_preempt": rng.random() < 0.5}
                if tier == "spot":
                    body["min_survival"] = rng.choice([0.0, 0.9, 0.99])
                try:
                    await tenant.call("POST", "/v1/bids", json=body)
                except RuntimeError as refusal:
                    out(f"  bid refused: {refusal}")
                orders += 1
                next_bid = elapsed + rng.uniform(0.2, 0.8)
            if elapsed >= next_reclaim and elapsed > 10:
                host = rng.choice(hosts)
                try:
                    reclaim = await owner.call("POST", "/v1/reclaims",
                                               json={"model": "H100-80GB", "gpus": 4, "host_id": host["id"]})
                    reclaims.append((elapsed + 15, reclaim["id"]))
                    out(f"  owner reclaims 4 GPUs of {host['name']}: {len(reclaim['leases'])} spot lease(s) get "
                        f"notice, {reclaim['taken_free']} idle GPU(s) taken"
                        + (f", {reclaim['shortfall']} short (firm leases are never reclaimed)"
                           if reclaim["shortfall"] else ""))
                except RuntimeError as refusal:
                    out(f"  reclaim refused: {refusal}")
                next_reclaim = elapsed + rng.uniform(12, 20)
            for due, reclaim_id in [r for r in reclaims if r[0] <= elapsed]:
                await owner.call("DELETE", f"/v1/reclaims/{reclaim_id}")
                reclaims.remove((due, reclaim_id))
            if elapsed >= next_print:
                await _print_ticker(base, admin, elapsed, out)
                next_print = elapsed + 3
            await asyncio.sleep(0.1)
        await _print_ticker(base, admin, time.monotonic() - started, out)
        for client in (admin, owner, *tenants):
            await client.http.aclose()
    finally:
        procs.stop()
    audit = subprocess.run([sys.executable, "-m", "exchange.cli", "audit"], env=env, capture_output=True, text=True)
    out(audit.stdout.strip() or audit.stderr.strip())
    return audit.returncode


async def _print_ticker(base: str, admin: Client, elapsed: float, out) -> None:
    markets = await admin.call("GET", "/v1/markets")
    leases = (await admin.call("GET", "/v1/leases", params={"limit": 500}))["items"]
    for market in markets:
        live = [le for le in leases if le["market"] == market["id"] and le["status"] in ("active", "ending")]
        preempted = sum(1 for le in leases if le["market"] == market["id"] and is_preemption(le["end_reason"]))
        out(f"{elapsed:5.0f}  {market['id']:<16}{market['last_price'] or '-':>8}{market['indicative_price'] or '-':>8}"
            f"{len(live):>8}{preempted:>10}")


def main(seconds: float, port: int | None, home: str | None, seed: int) -> int:
    folder = Path(home) if home else Path(tempfile.mkdtemp(prefix="gpux-demo-"))
    try:
        return asyncio.run(run_demo(seconds, port, folder, seed))
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except asyncio.CancelledError:
        return 128 + signal.SIGTERM
