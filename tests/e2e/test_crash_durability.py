"""SPEC §8: a killed server loses no acknowledged bid or posting."""
from __future__ import annotations

import asyncio
import signal

from tests.conftest import create_database
from tests.e2e.client import Api, unique
from tests.support import ADMIN_KEY, run_audit, start_server


async def test_bids_acknowledged_before_a_kill_survive_it(tmp_path, pg_server_url: str, template_db: str) -> None:
    db = await create_database(pg_server_url, template_db)
    server = start_server(tmp_path, database_url=db)
    try:
        async with Api(server.base_url, ADMIN_KEY) as admin:
            owner = await admin.new_account("owner")
            await owner.new_host(gpus=8)
            tenant = await admin.new_account("tenant", deposit="1000.00")
            bodies = [{"market": "H100-80GB/firm", "gpus": 1, "duration_s": 3600, "limit_price": "0.50",
                       "client_order_id": unique("k")} for _ in range(30)]
            responses = await asyncio.gather(*(tenant.request("POST", "/v1/bids", json=b) for b in bodies))
            acknowledged = {r.json()["id"] for r in responses if r.status_code == 201}
            tenant_key = tenant.key
        server.stop(signal.SIGKILL)  # no shutdown, no flush: what was acknowledged must be on disk

        server = start_server(tmp_path, database_url=db, port=int(server.base_url.rsplit(":", 1)[1]))
        async with Api(server.base_url, tenant_key) as tenant:
            listed = {b["id"] for b in (await tenant.ok("GET", "/v1/bids", params={"limit": 500}))["items"]}
            balance = await tenant.ok("GET", "/v1/accounts/me/balance")
        assert len(acknowledged) == 30 and acknowledged <= listed
        assert balance == {"available": "985.00", "held": "15.00"}
        assert run_audit(db).returncode == 0
    finally:
        server.stop()
