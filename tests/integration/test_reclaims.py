"""Owner reclaims: idle GPUs first, then the cheapest spot leases after their notice, never firm
leases, never part of a gang; free inside the owner's free window; requeue with original priority;
reservations ahead that the engine plans around."""
from __future__ import annotations

from datetime import timedelta

import pytest

from exchange.core.errors import ApiError
from exchange.ledger.audit import run_audit
from exchange.reclaims.schemas import ReclaimCreate
from exchange.reclaims.service import create_reclaim, release_reclaim
from exchange.settlement.service import settle
from tests.integration.scenario import START, Scenario, owner


async def leases(s: Scenario) -> list[dict]:
    return [dict(r) for r in await s.ctx.pool.fetch("SELECT * FROM leases ORDER BY id")]


async def _settle(s: Scenario):
    async with s.ctx.pool.acquire() as conn:
        return await settle(conn, s.clock(), fee_bps=0, max_gap_s=5.0, close_after_s=30)


async def by_coid(s: Scenario) -> dict[str, dict]:
    """Each lease, keyed by its bid's client order id (each bid here fills as one lease)."""
    rows = await s.ctx.pool.fetch("SELECT b.client_order_id AS coid, l.* FROM leases l JOIN bids b ON b.id = l.bid_id"
                                  " ORDER BY l.id")
    out: dict[str, dict] = {}
    for row in rows:
        assert row["coid"] not in out, f"bid {row['coid']} has more than one lease"
        out[row["coid"]] = dict(row)
    return out


def ending(leases: dict[str, dict]) -> set[str]:
    return {coid for coid, le in leases.items() if le["status"] == "ending"}


async def test_reclaim_takes_idle_gpus_then_the_cheapest_spot_lease_after_notice(s: Scenario) -> None:
    # Arrange: one 8-GPU host, all of it leased: a firm lease (2 GPUs), then the oldest spot lease
    # "cheap" (2 GPUs, alone in its tick: the floor, 1.00), then "dear" and "dear-2" (2 GPUs each)
    # in a tick where a 4-GPU ioc bid at 2.50 loses for lack of GPUs and so sets the price at 2.50.
    await s.market(floor="1.00", firm_hours=24)
    rich = await s.new_tenant("rich")
    await s.bid(market="H100-80GB/firm", gpus=2, duration_s=3600, limit="5.00", coid="firm")
    await s.tick()
    await s.bid(market="H100-80GB/spot", gpus=2, duration_s=3600, limit="3.00", coid="cheap")
    await s.tick()
    s.clock.advance(10)
    await s.bid(market="H100-80GB/spot", gpus=2, duration_s=3600, limit="3.00", coid="dear", tenant=rich)
    await s.bid(market="H100-80GB/spot", gpus=2, duration_s=3600, limit="3.00", coid="dear-2", tenant=rich)
    await s.bid(market="H100-80GB/spot", gpus=4, duration_s=3600, limit="2.50", coid="pricer", tenant=rich,
                time_in_force="ioc")
    await s.tick()
    before = await by_coid(s)
    assert {coid: (le["price"], le["gpus"]) for coid, le in before.items()} == {
        "firm": (1_000_000, 2), "cheap": (1_000_000, 2), "dear": (2_500_000, 2), "dear-2": (2_500_000, 2)}

    # Act: the owner wants 2 GPUs back now (none idle: all 8 leased).
    reclaim = await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=2))

    # Assert: the cheapest spot lease ends (though it is the oldest), after the offer's 120 s notice.
    after = await by_coid(s)
    assert ending(after) == {"cheap"} and [le.id for le in reclaim.leases] == [before["cheap"]["id"]]
    assert after["cheap"]["end_reason"] == "reclaimed" and after["cheap"]["end_at"] == s.clock() + timedelta(
        seconds=120)
    assert {coid: le["status"] for coid, le in after.items() if coid != "cheap"} == {
        "firm": "active", "dear": "active", "dear-2": "active"}
    assert reclaim.taken_free == 0 and reclaim.shortfall == 0 and reclaim.status == "active"


async def _three_hosts_three_prices(s: Scenario) -> None:
    """h1: 2 GPUs at floor 1.00, h2: 4 GPUs at 2.00, h3: 2 GPUs at 3.00, each filled by one bid
    alone in its tick, so each lease pays its host's floor: "a" 2 GPUs at 1.00, "b" 4 GPUs at 2.00,
    "c" 2 GPUs at 3.00. Every GPU is leased: a reclaim has no idle GPU to take."""
    await s.market(floor="1.00", gpus=2)
    await s.add_host("h2", gpus=4, floor="2.00")
    await s.add_host("h3", gpus=2, floor="3.00")
    for coid, gpus in (("a", 2), ("b", 4), ("c", 2)):
        await s.bid(market="H100-80GB/spot", gpus=gpus, duration_s=3600, limit="9.00", coid=coid)
        await s.tick()
        s.clock.advance(1)
    leases = await by_coid(s)
    assert {coid: (le["price"], le["gpus"]) for coid, le in leases.items()} == {
        "a": (1_000_000, 2), "b": (2_000_000, 4), "c": (3_000_000, 2)}


async def test_cheapest_first_spares_a_cheaper_lease_the_others_already_cover(s: Scenario) -> None:
    await _three_hosts_three_prices(s)

    # Need 4: the cheapest first are a (2 @ 1.00) then b (4 @ 2.00), 6 GPUs; b alone covers 4, so
    # a does not end for nothing. Then need 2 more: of a (1.00) and c (3.00), a.
    first = await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=4))
    after_first = ending(await by_coid(s))
    second = await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=2))
    after_second = await by_coid(s)

    assert after_first == {"b"} and [le.gpus for le in first.leases] == [4]
    assert ending(after_second) == {"a", "b"} and after_second["c"]["status"] == "active"
    assert [le.id for le in second.leases] == [after_second["a"]["id"]]
    assert (first.taken_free, first.shortfall, second.taken_free, second.shortfall) == (0, 0, 0, 0)


async def test_fewest_leases_takes_the_largest_gang_whatever_its_price(s: Scenario) -> None:
    await _three_hosts_three_prices(s)

    # Need 2: cheapest_first would end a (1.00); fewest_leases takes the largest gang first: b.
    reclaim = await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=2,
                                                                 strategy="fewest_leases"))

    assert ending(await by_coid(s)) == {"b"} and reclaim.strategy == "fewest_leases"


async def test_at_one_price_the_larger_gang_then_the_youngest_bid_ends(s: Scenario) -> None:
    # One 8-GPU host; "big" (4 GPUs), "old" (2) and "young" (2), placed in that order, fill in one
    # tick at the floor: one price, 1.00, for all three.
    await s.market(floor="1.00", gpus=8)
    for coid, gpus in (("big", 4), ("old", 2), ("young", 2)):
        await s.bid(market="H100-80GB/spot", gpus=gpus, duration_s=3600, limit="9.00", coid=coid)
    await s.tick()
    leases = await by_coid(s)
    assert {coid: (le["price"], le["gpus"]) for coid, le in leases.items()} == {
        "big": (1_000_000, 4), "old": (1_000_000, 2), "young": (1_000_000, 2)}

    # Need 4: "big" alone (one lease ends), though the oldest bid, rather than "old" and "young" (two).
    await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=4))
    after_first = ending(await by_coid(s))
    # Need 2: "old" and "young" tie on price and size: the youngest bid goes.
    await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=2))
    after_second = await by_coid(s)

    assert after_first == {"big"}
    assert ending(after_second) == {"big", "young"} and after_second["old"]["status"] == "active"


async def test_idle_gpus_go_first_and_firm_leases_are_never_taken(s: Scenario) -> None:
    await s.market(floor="1.00", firm_hours=24)
    await s.bid(market="H100-80GB/firm", gpus=6, duration_s=3600, limit="5.00")
    await s.tick()

    reclaim = await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=4))

    assert reclaim.taken_free == 2 and reclaim.shortfall == 2 and reclaim.leases == []
    assert all(le["status"] == "active" for le in await leases(s))
    with pytest.raises(ApiError) as too_many:
        await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=7))
    assert too_many.value.field == "gpus"


async def test_reclaimed_gpus_leave_the_market(s: Scenario) -> None:
    await s.market(floor="1.00")
    await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=6))

    await s.bid(market="H100-80GB/spot", gpus=4, duration_s=3600, limit="5.00")
    await s.tick()

    bid = await s.ctx.pool.fetchrow("SELECT status, unfilled_reason FROM bids")
    assert bid["status"] == "open" and bid["unfilled_reason"] in ("no_capacity", "too_large")


async def test_a_gang_ends_whole(s: Scenario) -> None:
    # A 12-GPU gang spans two 8-GPU hosts; reclaiming 2 GPUs of one host ends the whole gang.
    await s.market(floor="1.00", gpus=8)
    await s.add_host("h2", gpus=8, floor="1.00")
    await s.bid(market="H100-80GB/spot", gpus=12, duration_s=3600, limit="3.00")
    await s.tick()
    gang = await leases(s)
    assert len(gang) == 2 and sum(le["gpus"] for le in gang) == 12

    host = gang[0]["host_id"] if gang[0]["gpus"] == 8 else gang[1]["host_id"]
    await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=2, host_id=host))

    assert {le["status"] for le in await leases(s)} == {"ending"}


async def test_reclaim_inside_the_free_window_costs_the_tenant_nothing(s: Scenario) -> None:
    await s.market(floor="3.60")
    await s.bid(market="H100-80GB/spot", gpus=1, duration_s=7200, limit="5.00")
    await s.tick()
    lease = (await leases(s))[0]
    s.clock.advance(601)
    await s.report(1, lease["gpu_uuids"], START, 601)
    await _settle(s)
    assert (await leases(s))[0]["billed_amount"] == 600_000

    await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=8))  # 7 idle + the lease's 1
    s.clock.advance(200)  # the notice runs out
    await s.report(2, lease["gpu_uuids"], START + timedelta(seconds=601), 199)
    await s.tick()
    s.clock.advance(60)
    await _settle(s)

    final = (await leases(s))[0]
    assert (final["free_of_charge"], final["status"], final["closed"]) == (True, "ended", True)
    assert final["billed_amount"] == 0 and final["hold_amount"] == 0
    assert await s.balances(s.tenant_id) == {"available": 1_000_000_000, "held": 0}
    assert await s.balances(s.owner_id) == {"available": 0, "held": 0}
    async with s.ctx.pool.acquire() as conn:
        assert await run_audit(conn) == []


async def test_requeued_bid_keeps_its_priority_and_its_cost_is_one_query_away(s: Scenario) -> None:
    # Arrange: one 4-GPU host. Bid X (requeue_on_preempt) fills; the later bid Y, same size and
    # limit, rests in the book for lack of GPUs.
    await s.market(floor="1.00", gpus=4)
    x = await s.bid(market="H100-80GB/spot", gpus=4, duration_s=7200, limit="3.00", coid="x",
                    requeue_on_preempt=True)
    await s.tick()
    y = await s.bid(market="H100-80GB/spot", gpus=4, duration_s=7200, limit="3.00", coid="y")
    await s.tick()
    assert y.id > x.id
    assert dict(await s.ctx.pool.fetchrow("SELECT status, unfilled_reason FROM bids WHERE id = $1", y.id)) == {
        "status": "open", "unfilled_reason": "no_capacity"}

    # Act 1: past the free window X's lease is reclaimed; it ends after its notice; the settlement
    # that closes it puts X back in the book. The reclaim holds the GPUs all along, so Y cannot
    # take them in the meantime.
    s.clock.advance(4000)
    lease = (await leases(s))[0]
    await s.report(1, lease["gpu_uuids"], s.clock() - timedelta(seconds=3000), 3000)
    reclaim = await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=4,
                                                                 host_id=lease["host_id"]))
    s.clock.advance(121)
    await s.tick()  # the notice ran out: X's lease ends
    s.clock.advance(60)
    await _settle(s)  # closes X's lease and requeues X

    closed = (await leases(s))[0]
    bids = {r["id"]: r["status"] for r in await s.ctx.pool.fetch("SELECT id, status FROM bids")}
    assert (closed["status"], closed["end_reason"], closed["closed"]) == ("ended", "reclaimed", True)
    assert bids == {x.id: "open", y.id: "open"}
    from exchange.bids.service import bid_cost

    cost = await bid_cost(s.ctx, s.tenant_id, x.id)
    assert (cost.leases, cost.preemptions) == (1, 1) and closed["billed_amount"] > 0

    # Act 2: the owner gives the GPUs back: room for one of X and Y.
    await release_reclaim(s.ctx, owner(s), reclaim.id)
    await s.tick()

    # Assert: X, the earlier bid, fills; Y still waits.
    rows = await leases(s)
    bids = {r["id"]: r["status"] for r in await s.ctx.pool.fetch("SELECT id, status FROM bids")}
    assert [le["bid_id"] for le in rows] == [x.id, x.id] and rows[1]["status"] == "active"
    assert bids == {x.id: "filled", y.id: "open"}
    async with s.ctx.pool.acquire() as conn:
        assert await run_audit(conn) == []


async def test_a_reservation_ahead_keeps_spot_leases_from_crossing_it(s: Scenario) -> None:
    await s.market(floor="1.00", gpus=8)
    await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=8, at=START + timedelta(hours=1)))

    short = await s.bid(market="H100-80GB/spot", gpus=2, duration_s=1800, limit="3.00", coid="short")
    long_ = await s.bid(market="H100-80GB/spot", gpus=2, duration_s=7200, limit="3.00", coid="long")
    await s.tick()

    rows = {r["id"]: r for r in await s.ctx.pool.fetch("SELECT id, status, unfilled_reason FROM bids")}
    assert rows[short.id]["status"] == "filled"
    assert rows[long_.id]["status"] == "open" and rows[long_.id]["unfilled_reason"] == "reservation"
    s.clock.advance(3600)
    await s.tick()
    assert await s.ctx.pool.fetchval("SELECT status FROM reclaims") == "active"


async def test_an_outbid_spot_lease_ends_after_its_notice(s: Scenario) -> None:
    # A spot lease at limit 2.00 holds all 8 GPUs; a new 8-GPU bid at 3.00 loses for lack of GPUs
    # and so sets the price at 3.00, above the incumbent's limit: the incumbent is outbid.
    await s.market(floor="1.00", gpus=8)
    rival = await s.new_tenant("rival")
    await s.bid(market="H100-80GB/spot", gpus=8, duration_s=3600, limit="2.00", coid="incumbent")
    await s.tick()
    s.clock.advance(5)
    await s.bid(market="H100-80GB/spot", gpus=8, duration_s=3600, limit="3.00", coid="rival", tenant=rival)

    summary = await s.tick()
    lease = (await leases(s))[0]
    s.clock.advance(121)
    await s.tick()  # the notice ran out: the incumbent ends, the rival takes the GPUs
    after = await leases(s)

    assert summary.outbid == 1
    assert lease["status"] == "ending" and lease["end_reason"] == "outbid"
    assert lease["end_at"] == START + timedelta(seconds=5 + 120)
    assert after[0]["status"] == "ended" and len(after) == 2 and after[1]["status"] == "active"


async def test_idle_gpus_a_reclaim_took_are_not_sold_while_its_victim_runs_out_its_notice(s: Scenario) -> None:
    # Arrange: an 8-GPU host, a 6-GPU spot lease; the owner reclaims 4: the 2 idle GPUs now, and 2
    # of the lease's 6 when it ends after its notice.
    await s.market(floor="1.00")
    await s.bid(market="H100-80GB/spot", gpus=6, duration_s=3600, limit="3.00", coid="big")
    await s.tick()
    reclaim = await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=4))
    assert reclaim.taken_free == 2 and [le.gpus for le in reclaim.leases] == [6]

    # Act: a tenant bids for 2 GPUs during the notice, and again once the lease has ended.
    await s.bid(market="H100-80GB/spot", gpus=2, duration_s=3600, limit="3.00", coid="during")
    await s.tick()
    during = await by_coid(s)
    s.clock.advance(reclaim.leases[0].end_at.timestamp() - s.clock().timestamp() + 1)
    await s.tick()
    after = await by_coid(s)

    # Assert: the 2 idle GPUs were the owner's from the reclaim on (the old book sold them: the
    # victim's 6 GPUs hid the reclaim's 4); once the lease ended, 4 of 8 are the owner's and the
    # bid gets 2 of the other 4.
    assert "during" not in during, during.get("during")
    assert after["big"]["status"] == "ended" and after["during"]["gpus"] == 2
    s.clock.advance(40)
    await _settle(s)  # closes the ended lease, so the audit sees the day settled
    async with s.ctx.pool.acquire() as conn:
        assert await run_audit(conn) == []


async def test_the_audit_counts_a_victims_gpus_as_leased_and_the_idle_ones_as_reclaimed(s: Scenario) -> None:
    # The same day, audited during the notice: the victim's 6 GPUs are leased, the 2 idle ones the
    # reclaim's; 8 of 8. With the old book (a bid sold the 2 idle GPUs too) this check reads 10 of
    # 8 ("leased and reclaimed GPUs within each host's present GPUs"); the old check did not see it,
    # as it counted the victim's lease as the reclaim's 4 and no more.
    await s.market(floor="1.00")
    s.clock.advance(5)
    await s.bid(market="H100-80GB/spot", gpus=6, duration_s=3600, limit="3.00", coid="big")
    await s.tick()
    s.clock.advance(5)
    await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=4))
    await s.bid(market="H100-80GB/spot", gpus=2, duration_s=3600, limit="3.00", coid="during")
    await s.tick()
    async with s.ctx.pool.acquire() as conn:
        assert await run_audit(conn, now=s.clock()) == []


async def test_the_public_book_offers_what_the_matching_book_sells(s: Scenario) -> None:
    # An 8-GPU host: a 6-GPU lease, then the owner withdraws the offer and publishes it again (as
    # an agent renewing its offer does while leases run), then reclaims 1 GPU. The public book used
    # to count each offer's own leases only: 8 free on the new offer (the web demo's utilisation
    # read 38 GPUs offered of 32). Now it reads what the matching book sells: 8 - 6 - 1 = 1.
    from exchange.markets.service import compute_books
    from exchange.offers.schemas import OfferCreate
    from exchange.offers.service import create_offer, withdraw_offer

    await s.market(floor="1.00")
    await s.bid(market="H100-80GB/spot", gpus=6, duration_s=3600, limit="3.00", coid="big")
    await s.tick()
    first = (await s.ctx.pool.fetchrow("SELECT id, host_id, available_until FROM offers"))
    await withdraw_offer(s.ctx, owner(s), first["id"])
    await create_offer(s.ctx, owner(s), OfferCreate(host_id=first["host_id"], gpus=8, floor_price="1.00",
                                                    available_until=first["available_until"]))
    await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=1))
    books = await compute_books(s.ctx.pool, s.clock(), ["H100-80GB/spot"])
    assert books["H100-80GB/spot"][1] == {1_000_000: 1}
