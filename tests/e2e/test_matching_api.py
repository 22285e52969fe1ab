"""Issue 3, must-show 2: through the API, offers and bids cross within two ticks."""
from __future__ import annotations

import asyncio
import time

from tests.e2e.client import Api, in_hours, in_seconds, unique
from tests.support import run_audit

TICK_S = 0.5  # the e2e server's GPUX_TICK_S


async def wait_for(predicate, timeout: float = 10 * TICK_S):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(TICK_S / 5)


async def test_crossing_orders_make_leases_trades_and_prices(admin: Api, server_db: str) -> None:
    # Arrange: an 8-GPU host (a model of its own, so other tests' hosts don't interfere) offered at
    # 1.80 from a few seconds ahead, so that all bids below rest before the supply arrives and cross
    # in one tick; three tenants: two that cross, one too low and one ioc that cannot fill.
    owner = await admin.new_account("owner")
    model = f"T{unique('gpu').replace('-', '')}-80GB"
    host, _ = await owner.new_host(gpus=8, model=model, fabric=unique("pod"))
    await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": 8, "floor_price": "1.80",
                                                    "available_from": in_seconds(3), "available_until": in_hours(24)})
    market = f"{model}/spot"
    alice = await admin.new_account("tenant", deposit="500.00")
    bob = await admin.new_account("tenant", deposit="500.00")
    carol = await admin.new_account("tenant", deposit="500.00")

    # Act: alice 4 GPUs @3.00, bob 4 GPUs @2.50, carol 4 @2.00 (loses), carol ioc 4 @1.90 (loses, gone).
    a = await alice.ok("POST", "/v1/bids", 201, json={"market": market, "gpus": 4, "duration_s": 3600,
                                                      "limit_price": "3.00", "client_order_id": "a"})
    b = await bob.ok("POST", "/v1/bids", 201, json={"market": market, "gpus": 4, "duration_s": 3600,
                                                    "limit_price": "2.50", "client_order_id": "b"})
    c = await carol.ok("POST", "/v1/bids", 201, json={"market": market, "gpus": 4, "duration_s": 3600,
                                                      "limit_price": "2.00", "client_order_id": "c"})
    d = await carol.ok("POST", "/v1/bids", 201, json={"market": market, "gpus": 4, "duration_s": 3600,
                                                      "limit_price": "1.90", "client_order_id": "d",
                                                      "time_in_force": "ioc"})

    async def settled():
        bids = [await alice.ok("GET", f"/v1/bids/{a['id']}"), await bob.ok("GET", f"/v1/bids/{b['id']}"),
                await carol.ok("GET", f"/v1/bids/{c['id']}"), await carol.ok("GET", f"/v1/bids/{d['id']}")]
        done = (bids[0]["status"] == "filled" and bids[1]["status"] == "filled" and bids[3]["status"] == "cancelled"
                and bids[2]["unfilled_reason"] is not None)
        return bids if done else None

    bids = await wait_for(settled)

    # Assert: both winners filled at one uniform price: the highest losing limit (2.00) is above the
    # floor (1.80) and below the lowest winning limit (2.50).
    assert bids, "orders did not cross within the ticks allowed"
    alice_leases = (await alice.ok("GET", "/v1/leases"))["items"]
    bob_leases = (await bob.ok("GET", "/v1/leases"))["items"]
    assert [le["gpus"] for le in alice_leases] == [4] and [le["gpus"] for le in bob_leases] == [4]
    assert {le["price"] for le in alice_leases + bob_leases} == {"2.00"}
    assert set(alice_leases[0]["gpu_uuids"]).isdisjoint(bob_leases[0]["gpu_uuids"])
    assert (await carol.ok("GET", "/v1/leases"))["items"] == []
    # The resting bid says why: no GPUs left for it (the winners took the host) or priced out.
    assert bids[2]["status"] == "open" and bids[2]["unfilled_reason"] in ("no_capacity", "limit_below_price")
    assert bids[3]["status"] == "cancelled"
    # Holds narrowed: a spot lease keeps its limit × GPUs × duration (the spot price may rise to it).
    assert await alice.ok("GET", "/v1/accounts/me/balance") == {"available": "488.00", "held": "12.00"}
    assert await bob.ok("GET", "/v1/accounts/me/balance") == {"available": "490.00", "held": "10.00"}
    assert await carol.ok("GET", "/v1/accounts/me/balance") == {"available": "492.00", "held": "8.00"}
    markets = {m["id"]: m for m in await admin.ok("GET", "/v1/markets")}
    assert markets[market]["last_price"] == "2.00"
    owner_leases = (await owner.ok("GET", "/v1/leases"))["items"]
    assert {le["id"] for le in owner_leases} == {alice_leases[0]["id"], bob_leases[0]["id"]}
    audit = run_audit(server_db)
    assert audit.returncode == 0, audit.stdout


async def test_firm_lease_narrows_its_hold_to_the_cleared_price(admin: Api) -> None:
    owner = await admin.new_account("owner")
    model = f"F{unique('gpu').replace('-', '')}-80GB"
    host, _ = await owner.new_host(gpus=8, model=model, fabric=unique("pod"))
    await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": 8, "floor_price": "1.50",
                                                    "available_until": in_hours(24), "firm_until": in_hours(12)})
    tenant = await admin.new_account("tenant", deposit="100.00")
    bid = await tenant.ok("POST", "/v1/bids", 201, json={"market": f"{model}/firm", "gpus": 2, "duration_s": 7200,
                                                          "limit_price": "4.00", "client_order_id": "f"})

    async def filled():
        return (await tenant.ok("GET", f"/v1/bids/{bid['id']}"))["status"] == "filled"

    assert await wait_for(filled)
    lease = (await tenant.ok("GET", "/v1/leases"))["items"][0]
    # Alone in the market: no loser, so the price is the floor; the hold is price × 2 GPUs × 2 h.
    assert lease["price"] == "1.50" and lease["tier"] == "firm" and lease["hold"] == "6.00"
    assert await tenant.ok("GET", "/v1/accounts/me/balance") == {"available": "94.00", "held": "6.00"}


async def test_a_bid_no_firm_window_fits_says_so(admin: Api) -> None:
    owner = await admin.new_account("owner")
    model = f"W{unique('gpu').replace('-', '')}-80GB"
    host, _ = await owner.new_host(gpus=8, model=model, fabric=unique("pod"))
    await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": 8, "floor_price": "1.00",
                                                    "available_until": in_hours(24), "firm_until": in_hours(1)})
    tenant = await admin.new_account("tenant", deposit="100.00")
    bid = await tenant.ok("POST", "/v1/bids", 201, json={"market": f"{model}/firm", "gpus": 1, "duration_s": 3 * 3600,
                                                          "limit_price": "2.00", "client_order_id": "w"})

    async def reasoned():
        return (await tenant.ok("GET", f"/v1/bids/{bid['id']}"))["unfilled_reason"]

    assert await wait_for(reasoned) == "no_firm_window"
