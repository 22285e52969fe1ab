"""POST /v1/reclaims over HTTP: the wire shape, ownership, and a tenant seeing its notice."""
from __future__ import annotations

import asyncio

from tests.e2e.client import Api, in_seconds, unique


async def test_owner_reclaims_and_tenant_sees_the_notice(admin: Api) -> None:
    owner = await admin.new_account("owner")
    other_owner = await admin.new_account("owner")
    model = f"R{unique('gpu').replace('-', '')}-80GB"
    host, _ = await owner.new_host(gpus=4, model=model, fabric=unique("pod"))
    await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": 4, "floor_price": "1.00",
                                                    "available_until": in_seconds(7200), "reclaim_notice_s": 60})
    tenant = await admin.new_account("tenant", deposit="100.00")
    await tenant.ok("POST", "/v1/bids", 201, json={"market": f"{model}/spot", "gpus": 4, "duration_s": 3600,
                                                   "limit_price": "2.00", "client_order_id": "r1"})
    for _ in range(40):
        if (await tenant.ok("GET", "/v1/leases"))["items"]:
            break
        await asyncio.sleep(0.25)

    reclaim = await owner.ok("POST", "/v1/reclaims", 201, json={"model": model, "gpus": 4, "host_id": host["id"]})
    not_yours = await other_owner.request("POST", "/v1/reclaims", json={"model": model, "gpus": 1,
                                                                         "host_id": host["id"]})
    by_tenant = await tenant.request("POST", "/v1/reclaims", json={"model": model, "gpus": 1})
    lease = (await tenant.ok("GET", "/v1/leases"))["items"][0]

    assert reclaim["status"] == "active" and [le["id"] for le in reclaim["leases"]] == [lease["id"]]
    assert reclaim["leases"][0]["free_of_charge"] is True
    assert lease["status"] == "ending" and lease["end_reason"] == "reclaimed" and lease["end_at"]
    assert not_yours.status_code == 404 and by_tenant.status_code == 403
    assert (await owner.ok("GET", f"/v1/reclaims/{reclaim['id']}"))["id"] == reclaim["id"]
