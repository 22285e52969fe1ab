"""Isolation between owners over HTTP and websockets on a real server (issue 11): a multi-host gang
never spans owners; another owner's host cannot take a GPU its host still has or a live lease holds,
and its host keeps reporting; owners and agents never see the tenant's limit, hold or bid id; a
reclaim retried with its idempotency key is one reclaim."""
from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone

import websockets

from exchange.feed.client import ws_url
from tests.e2e.client import Api, in_seconds, rfc3339, unique
from tests.e2e.test_stream import next_events

TENANT_ONLY = {"limit_price", "hold", "bid_id"}


def _model(prefix: str) -> str:
    return f"{prefix}{unique('gpu').replace('-', '')}-80GB"


async def _offer(owner: Api, host: dict, gpus: int, floor: str, **extra) -> None:
    await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": gpus, "floor_price": floor,
                                                    "available_until": in_seconds(7200), **extra})


async def _leases(api: Api, want: int) -> list[dict]:
    """The caller's leases once there are `want` of them (the matching ticks on its own)."""
    for _ in range(120):
        items = (await api.ok("GET", "/v1/leases"))["items"]
        if len(items) >= want:
            return items
        await asyncio.sleep(0.25)
    raise AssertionError(f"no {want} leases: {items}")


async def test_a_two_host_gang_never_spans_owners(admin: Api) -> None:
    # Arrange: owner B's host and owner A's first host are the cheapest whole hosts of fabric "default".
    a = await admin.new_account("owner")
    b = await admin.new_account("owner")
    model = _model("G")
    b_host, _ = await b.new_host(gpus=4, model=model, fabric="default")
    await _offer(b, b_host, 4, "1.00")
    a_hosts = []
    for floor in ("1.00", "1.50"):
        host, _ = await a.new_host(gpus=4, model=model, fabric="default")
        await _offer(a, host, 4, floor)
        a_hosts.append(host["id"])
    tenant = await admin.new_account("tenant", deposit="100.00")

    # Act: a gang of two whole hosts.
    await tenant.ok("POST", "/v1/bids", 201, json={"market": f"{model}/spot", "gpus": 8, "duration_s": 3600,
                                                   "limit_price": "2.00", "client_order_id": "gang"})
    leases = await _leases(tenant, 2)

    # Assert: on A's two hosts only.
    assert sorted(le["host_id"] for le in leases) == a_hosts
    assert (await b.ok("GET", "/v1/leases"))["items"] == []


async def test_another_owners_host_cannot_take_a_gpu_its_host_has_or_a_lease_holds(admin: Api) -> None:
    # Arrange: A's 2-GPU host fully leased; B has a host of its own.
    a = await admin.new_account("owner")
    b = await admin.new_account("owner")
    model = _model("M")
    a_host, a_agent = await a.new_host(gpus=2, model=model, fabric=unique("pod"))
    await _offer(a, a_host, 2, "1.00")
    _, b_agent = await b.new_host(gpus=1, model=model, fabric=unique("pod"))
    b_gpus = (await b_agent.ok("GET", f"/v1/hosts/{(await b_agent.ok('GET', '/v1/agent/me'))['host_id']}"))["gpus"]
    tenant = await admin.new_account("tenant", deposit="100.00")
    await tenant.ok("POST", "/v1/bids", 201, json={"market": f"{model}/spot", "gpus": 2, "duration_s": 3600,
                                                   "limit_price": "2.00", "client_order_id": "hold"})
    await _leases(tenant, 1)
    a_gpus = (await a.ok("GET", f"/v1/hosts/{a_host['id']}"))["gpus"]
    kept, moving = a_gpus[0], a_gpus[1]

    def inventory(gpus: list[dict]) -> dict:
        return {"gpus": [{"uuid": g["uuid"], "model": model, "memory_mb": g["memory_mb"]} for g in gpus]}

    # Act: B claims A's GPU while A has it; A drops it (its lease still holds it); B claims it again.
    while_present = await b_agent.request("PUT", "/v1/agent/inventory", json=inventory(b_gpus + [moving]))
    await a_agent.ok("PUT", "/v1/agent/inventory", json=inventory([kept]))
    while_leased = await b_agent.request("PUT", "/v1/agent/inventory", json=inventory(b_gpus + [moving]))

    # Assert: both refused naming the GPU, B's inventory unchanged; A keeps reporting, and metering it.
    for refused in (while_present, while_leased):
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"]["code"] == "gpu_on_other_host" and moving["uuid"] in refused.text
    assert [g["uuid"] for g in (await b.ok("GET", "/v1/hosts"))["items"][0]["gpus"]] == [g["uuid"] for g in b_gpus]
    await a_agent.ok("PUT", "/v1/agent/inventory", json=inventory([kept, moving]))
    sample = {"ts": rfc3339(datetime.now(timezone.utc)), "util": 50, "mem_used_mb": 1000, "power_mw": 300_000,
              "energy_mj": 1_000, "temp_c": 50, "healthy": True}
    ack = await a_agent.request("POST", "/v1/agent/meter", json={"seq": 1, "samples": [
        dict(sample, uuid=kept["uuid"]), dict(sample, uuid=moving["uuid"])]})
    assert ack.status_code in (200, 202) and ack.json()["accepted"] == 2, ack.text


async def test_owners_and_agents_never_see_the_tenants_limit_hold_or_bid(admin: Api, server) -> None:
    owner = await admin.new_account("owner")
    model = _model("V")
    host, agent = await owner.new_host(gpus=2, model=model, fabric=unique("pod"))
    await _offer(owner, host, 2, "1.00", reclaim_notice_s=90)
    tenant = await admin.new_account("tenant", deposit="100.00")
    url = ws_url(server.base_url).replace("/v1/feed", "/v1/stream")
    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {owner.key}"}) as stream:
        assert json.loads(await stream.recv())["type"] == "ready"
        await tenant.ok("POST", "/v1/bids", 201, json={"market": f"{model}/spot", "gpus": 2, "duration_s": 3600,
                                                       "limit_price": "2.00", "client_order_id": "v"})
        lease_id = (await _leases(tenant, 1))[0]["id"]
        reclaim = await owner.ok("POST", "/v1/reclaims", 201, json={"model": model, "gpus": 2})
        events = await next_events(stream, {"lease_started", "notice"})

    views = {
        "owner's /v1/leases": (await owner.ok("GET", "/v1/leases"))["items"],
        "owner's /v1/leases/{id}": [await owner.ok("GET", f"/v1/leases/{lease_id}")],
        "agent's /v1/agent/leases": (await agent.ok("GET", "/v1/agent/leases"))["items"],
        "reclaim response": reclaim["leases"],
        "owner's stream events": [e["data"] for e in events if e["type"] in ("lease_started", "notice")],
    }
    for where, items in views.items():
        assert items and all(le["id"] == lease_id for le in items), where
        assert not [sorted(TENANT_ONLY & set(le)) for le in items if TENANT_ONLY & set(le)], where
    # The tenant's own view still has them.
    assert TENANT_ONLY <= set(await tenant.ok("GET", f"/v1/leases/{lease_id}"))


async def test_a_reclaim_retried_with_its_key_is_one_reclaim(admin: Api) -> None:
    # Arrange: two 2-GPU leases on a 4-GPU host: a second reclaim of 2 would end the second lease.
    owner = await admin.new_account("owner")
    other = await admin.new_account("owner")
    model = _model("K")
    host, _ = await owner.new_host(gpus=4, model=model, fabric=unique("pod"))
    await _offer(owner, host, 4, "1.00", reclaim_notice_s=90)
    await other.new_host(gpus=1, model=model, fabric=unique("pod"))
    tenant = await admin.new_account("tenant", deposit="100.00")
    for coid in ("k1", "k2"):
        await tenant.ok("POST", "/v1/bids", 201, json={"market": f"{model}/spot", "gpus": 2, "duration_s": 3600,
                                                       "limit_price": "2.00", "client_order_id": coid})
    await _leases(tenant, 2)
    body = {"model": model, "gpus": 2, "idempotency_key": "take-2"}

    # Act
    first = await owner.request("POST", "/v1/reclaims", json=body)
    retry = await owner.request("POST", "/v1/reclaims", json=body)
    other_body = await owner.request("POST", "/v1/reclaims", json=dict(body, gpus=1))
    others_key = await other.request("POST", "/v1/reclaims", json={"model": model, "gpus": 1,
                                                                   "idempotency_key": "take-2"})

    # Assert: one reclaim, one lease ended; the same answer again; another body is a conflict; the
    # key is the owner's own (another owner using it gets its own reclaim).
    assert first.status_code == 201 and "idempotent-replayed" not in first.headers, first.text
    assert retry.status_code == 201 and retry.headers["idempotent-replayed"] == "true"
    assert retry.json() == first.json() and first.json()["idempotency_key"] == "take-2"
    assert other_body.status_code == 409 and other_body.json()["error"]["code"] == "idempotency_conflict"
    assert others_key.status_code == 201 and others_key.json()["id"] != first.json()["id"]
    assert len((await owner.ok("GET", "/v1/reclaims"))["items"]) == 1
    statuses = sorted(le["status"] for le in (await tenant.ok("GET", "/v1/leases"))["items"])
    assert statuses == ["active", "ending"]
