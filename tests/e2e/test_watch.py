"""`gpux watch MARKET --once`: the terminal view, from the same feed, against a running server."""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

from tests.e2e.client import Api, in_seconds, unique


async def test_watch_prints_price_depth_and_trades(admin: Api, server) -> None:
    owner = await admin.new_account("owner")
    model = f"V{unique('gpu').replace('-', '')}-80GB"
    host, _ = await owner.new_host(gpus=4, model=model, fabric=unique("pod"))
    await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": 4, "floor_price": "1.50",
                                                    "available_until": in_seconds(7200)})
    tenant = await admin.new_account("tenant", deposit="100.00")
    await tenant.ok("POST", "/v1/bids", 201, json={"market": f"{model}/spot", "gpus": 2, "duration_s": 3600,
                                                   "limit_price": "2.00", "client_order_id": "w1"})
    await tenant.ok("POST", "/v1/bids", 201, json={"market": f"{model}/spot", "gpus": 8, "duration_s": 3600,
                                                   "limit_price": "1.20", "client_order_id": "w2"})
    for _ in range(40):
        if (await tenant.ok("GET", "/v1/leases"))["items"]:
            break
        await asyncio.sleep(0.25)
    await asyncio.sleep(1.5)  # the tick's market data is published after its commit

    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "exchange.cli", "watch", f"{model}/spot", "--url", server.base_url, "--once",
        "--no-color"], capture_output=True, text=True, timeout=60, env=dict(os.environ))

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{model}/spot" in done.stdout and "1.50" in done.stdout  # the price (alone: the floor)
    assert "1.20" in done.stdout  # the resting bid's level in the depth


async def test_watch_json_prints_each_feed_message_as_a_json_line(admin: Api, server, tmp_path) -> None:
    owner = await admin.new_account("owner")
    model = f"V{unique('gpu').replace('-', '')}-80GB"
    host, _ = await owner.new_host(gpus=2, model=model, fabric=unique("pod"))
    await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": 2, "floor_price": "1.75",
                                                    "available_until": in_seconds(7200)})
    await asyncio.sleep(1.5)  # a tick publishes the ask
    # The URL from GPUX_URL, as for every other command (no --url).
    env = dict(os.environ, GPUX_URL=server.base_url, GPUX_CONFIG=str(tmp_path / "none.toml"))
    done = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "exchange.cli", "watch", f"{model}/spot", "--once", "--json"],
        capture_output=True, text=True, timeout=60, env=env)

    assert done.returncode == 0, done.stdout + done.stderr
    messages = [json.loads(line) for line in done.stdout.splitlines()]
    snapshots = {m["channel"]: m for m in messages if m["type"] == "snapshot"}
    assert {"book", "ticker", "trades"} <= set(snapshots)
    assert snapshots["book"]["data"]["asks"] == [{"price": "1.75", "gpus": 2}]

    unknown = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "exchange.cli", "watch", "NOPE-1GB/spot", "--once", "--json"],
        capture_output=True, text=True, timeout=60, env=env)
    assert unknown.returncode == 1 and json.loads(unknown.stdout.splitlines()[-1])["type"] == "error"
