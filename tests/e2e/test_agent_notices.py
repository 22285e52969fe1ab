"""Issue 12, must-show 3 (first half): an owner's reclaim reaches the workload where it runs. A real
`gpux agent --simulate --metadata-port` against a real `gpux serve`: the reclaim's notice appears as
the file named by the hooks' GPUX_NOTICE_FILE and on the agent's 127.0.0.1 endpoint (404 before),
and both are gone once the lease has ended."""
from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import httpx

from tests.e2e.client import Api
from tests.e2e.test_agent_settlement import until
from tests.support import ADMIN_KEY, free_port, start_agent, start_server

SERVER_ENV = {"GPUX_TICK_S": "0.2", "GPUX_SETTLE_S": "1", "GPUX_MIN_DURATION_S": "5"}
NOTICE_S = 8  # the offer's reclaim notice: long enough to read the notice, short enough to see the end


async def test_reclaim_notice_reaches_the_file_and_the_local_endpoint(tmp_path: Path, fresh_db: str) -> None:
    server = start_server(tmp_path, database_url=fresh_db, extra_env=SERVER_ENV)
    hooks = tmp_path / "hooks.log"
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f'floor_price = "2.00"\nreclaim_notice_s = {NOTICE_S}\nreclaim_rate_per_h = 0.0\noffer_horizon_s = 3600\n'
        f'on_lease_start = "echo start $GPUX_LEASE_ID $GPUX_NOTICE_FILE >> {hooks}"\n')
    port = free_port()
    local = f"http://127.0.0.1:{port}"
    agent = None
    try:
        async with Api(server.base_url, ADMIN_KEY) as admin, httpx.AsyncClient(base_url=local) as metadata:
            owner = await admin.new_account("owner")
            host = await owner.ok("POST", "/v1/hosts", 201, json={"name": "sim-0", "fabric": "pod-a"})
            agent = start_agent(tmp_path, server.base_url, host["agent_token"], host="sim-0", policy=policy,
                                extra_args=("--metadata-port", str(port)))

            async def offer_live():
                return bool((await owner.ok("GET", "/v1/offers", params={"status": "live"}))["items"])

            assert await until(offer_live, every=0.1), agent.log()
            tenant = await admin.new_account("tenant", deposit="100.00")
            await tenant.ok("POST", "/v1/bids", 201, json={
                "market": "H100-80GB/spot", "gpus": 8, "duration_s": 600, "limit_price": "3.00",
                "client_order_id": "job-1"})

            async def started():
                return hooks.exists() and hooks.read_text().split()

            line = await until(started, every=0.1)
            assert line and line[0] == "start", agent.log()
            lease_id, notice_file = line[1], Path(line[2])
            # Before any notice: no file, and the endpoint answers 404 (AWS: 404 until a notice).
            before = await metadata.get(f"/v1/leases/{lease_id}/notice")
            aws_before = await metadata.get("/latest/meta-data/spot/instance-action")
            listed_before = (await metadata.get("/v1/notices")).json()
            exists_before = notice_file.exists()

            # Act: the owner reclaims the host's 8 GPUs.
            await owner.ok("POST", "/v1/reclaims", 201, json={"model": "H100-80GB", "gpus": 8, "host_id": host["id"]})
            reclaimed_at = time.monotonic()

            async def file_written():
                return notice_file.exists()

            assert await until(file_written, every=0.01), agent.log()
            latency_s = time.monotonic() - reclaimed_at
            print(f"\nnotice latency, reclaim response -> notice file on the host: {latency_s * 1000:.0f} ms")
            notice = json.loads(notice_file.read_text())
            lease = (await tenant.ok("GET", "/v1/leases"))["items"][0]
            served = await metadata.get(f"/v1/leases/{lease_id}/notice")
            aws = await metadata.get("/latest/meta-data/spot/instance-action")
            listed = (await metadata.get("/v1/notices")).json()
            mode = notice_file.stat().st_mode & 0o777

            async def file_removed():
                return not notice_file.exists() and (await metadata.get(f"/v1/leases/{lease_id}/notice")).status_code == 404

            removed = await until(file_removed, timeout=NOTICE_S + 30, every=0.1)
    finally:
        if agent is not None:
            agent.stop()
        server.stop()

    assert before.status_code == 404 and before.json()["error"]["code"] == "not_found"
    assert aws_before.status_code == 404 and listed_before == {"items": []} and not exists_before
    assert notice_file.parent == agent.data_dir / "notices"
    assert notice["lease_id"] == lease_id == str(lease["id"]) and lease["status"] == "ending"
    assert notice["action"] == "terminate" and notice["reason"] == "reclaimed" == lease["end_reason"]
    assert datetime.fromisoformat(notice["time"]) == datetime.fromisoformat(lease["end_at"])
    assert len(notice["gpu_uuids"]) == 8 and mode == 0o644
    assert served.status_code == 200 and served.json() == notice
    assert aws.status_code == 200 and aws.json() == {"action": "terminate", "time": notice["time"]}
    assert listed == {"items": [notice]}
    assert removed, agent.log()
