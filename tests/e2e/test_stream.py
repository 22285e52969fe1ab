"""WS /v1/stream: a tenant's and an owner's private events, in order, with replay."""
from __future__ import annotations

import asyncio
import json

import websockets

from exchange.feed.client import ws_url
from tests.e2e.client import Api, in_seconds, unique


async def next_events(ws, kinds: set[str], timeout: float = 15) -> list[dict]:
    """Read envelopes until every kind in `kinds` was seen (heartbeats skipped)."""
    seen: list[dict] = []
    async with asyncio.timeout(timeout):
        while not kinds <= {e["type"] for e in seen}:
            event = json.loads(await ws.recv())
            if event["type"] != "heartbeat":
                seen.append(event)
    return seen


async def test_fill_notice_and_replay_reach_the_tenant_and_the_owner(admin: Api, server) -> None:
    owner = await admin.new_account("owner")
    model = f"S{unique('gpu').replace('-', '')}-80GB"
    host, _ = await owner.new_host(gpus=2, model=model, fabric=unique("pod"))
    await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": 2, "floor_price": "1.00",
                                                    "available_until": in_seconds(7200), "reclaim_notice_s": 90})
    tenant = await admin.new_account("tenant", deposit="100.00")
    url = ws_url(server.base_url).replace("/v1/feed", "/v1/stream")

    async with websockets.connect(url, additional_headers={"Authorization": f"Bearer {tenant.key}"}) as mine, \
            websockets.connect(url, additional_headers={"Authorization": f"Bearer {owner.key}"}) as owners:
        ready = json.loads(await mine.recv())
        assert ready["type"] == "ready" and ready["seq"] == 0
        assert json.loads(await owners.recv())["type"] == "ready"

        # Act: a bid fills; then the owner takes both GPUs back.
        await tenant.ok("POST", "/v1/bids", 201, json={"market": f"{model}/spot", "gpus": 2, "duration_s": 3600,
                                                       "limit_price": "2.00", "client_order_id": "s1"})
        started = await next_events(mine, {"fill", "lease_started"})
        await owner.ok("POST", "/v1/reclaims", 201, json={"model": model, "gpus": 2, "host_id": host["id"]})
        notice = await next_events(mine, {"notice"})
        owner_events = await next_events(owners, {"lease_started", "notice"})

    # Assert: in order, seq rising by one, the lease inside; the notice says when it ends.
    events = started + notice
    assert [e["type"] for e in events] == ["fill", "lease_started", "notice"]
    assert [e["seq"] for e in events] == [1, 2, 3]
    assert events[2]["data"]["status"] == "ending" and events[2]["data"]["end_reason"] == "reclaimed"
    assert events[2]["data"]["end_at"] and events[0]["data"]["gpus"] == 2 and events[0]["market"] == f"{model}/spot"
    assert [e["type"] for e in owner_events] == ["lease_started", "notice"]

    # A client that was away replays from where it was (key in the first message).
    async with websockets.connect(url) as again:
        await again.send(json.dumps({"op": "auth", "key": tenant.key, "since": 1}))
        assert json.loads(await again.recv())["type"] == "ready"
        replay = await next_events(again, {"lease_started", "notice"})
    assert [(e["type"], e["seq"]) for e in replay] == [("lease_started", 2), ("notice", 3)]


async def test_a_bad_key_is_refused(server) -> None:
    url = ws_url(server.base_url).replace("/v1/feed", "/v1/stream")
    async with websockets.connect(url) as ws:
        await ws.send(json.dumps({"op": "auth", "key": "gpx_nope"}))
        error = json.loads(await ws.recv())
        try:
            await asyncio.wait_for(ws.recv(), 5)
        except websockets.ConnectionClosed as closed:
            code = closed.rcvd.code
    assert error["type"] == "error" and error["data"]["code"] == "unauthorized" and code == 4401
