"""Owner reclaims: idle GPUs first, then the cheapest spot leases after their notice, never firm
leases, never part of a gang; free inside the owner's free window; requeue with original priority;
reservations ahead that the engine plans around."""
from __future__ import annotations

from datetime import timedelta

import pytest

from exchange.core.auth import Principal
from exchange.core.errors import ApiError
from exchange.ledger.audit import run_audit
from exchange.reclaims.schemas import ReclaimCreate
from exchange.reclaims.service import create_reclaim
from exchange.settlement.service import settle
from tests.integration.scenario import START, Scenario


@pytest.fixture
async def s(db_url: str):
    scenario = await Scenario.create(db_url, fee_bps=0)
    yield scenario
    await scenario.close()


def owner(s: Scenario) -> Principal:
    return Principal(role="owner", account_id=s.owner_id)


async def leases(s: Scenario) -> list[dict]:
    return [dict(r) for r in await s.ctx.pool.fetch("SELECT * FROM leases ORDER BY id")]


async def _settle(s: Scenario):
    async with s.ctx.pool.acquire() as conn:
        return await settle(conn, s.clock(), fee_bps=0, max_gap_s=5.0, close_after_s=30)


async def test_reclaim_takes_idle_gpus_then_the_cheapest_spot_lease_after_notice(s: Scenario) -> None:
    # Arrange: one 8-GPU host; a firm lease (2 GPUs) and two spot leases (2 @ 3.00, 2 @ 2.00) at
    # different prices (placed in separate ticks); 2 GPUs idle.
    await s.market(floor="1.00", firm_hours=24)
    rich = await s.new_tenant("rich")
    await s.bid(market="H100-80GB/firm", gpus=2, duration_s=3600, limit="5.00", coid="firm")
    await s.tick()
    await s.bid(market="H100-80GB/spot", gpus=2, duration_s=3600, limit="3.00", coid="dear", tenant=rich)
    await s.bid(market="H100-80GB/spot", gpus=2, duration_s=3600, limit="3.00", coid="dear-2", tenant=rich)
    await s.tick()
    s.clock.advance(10)
    await s.bid(market="H100-80GB/spot", gpus=2, duration_s=3600, limit="2.00", coid="cheap")
    # The cheap bid is alone in its tick, at the floor; the others paid the tick's price.
    await s.tick()
    before = {le["id"]: le for le in await leases(s)}
    assert len(before) == 4 and sum(le["gpus"] for le in before.values()) == 8

    # Act: the owner wants 2 GPUs back now (none idle: all 8 leased) -> the cheapest spot lease ends.
    reclaim = await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=2))

    # Assert
    after = {le["id"]: le for le in await leases(s)}
    ending = [le for le in after.values() if le["status"] == "ending"]
    cheapest = min((le for le in before.values() if le["tier"] == "spot"), key=lambda le: (le["price"], -le["id"]))
    assert [le["id"] for le in ending] == [cheapest["id"]] and reclaim.leases[0].id == cheapest["id"]
    assert ending[0]["end_reason"] == "reclaimed" and ending[0]["end_at"] == s.clock() + timedelta(seconds=120)
    assert all(le["status"] == "active" for le in after.values() if le["tier"] == "firm")
    assert reclaim.taken_free == 0 and reclaim.shortfall == 0 and reclaim.status == "active"


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
    # Two hosts; a requeueing bid lands on h1 (the cheaper); h1 is reclaimed; a later bid takes h2;
    # when the reclaimed lease closes, the first bid is back in the book under its original id.
    await s.market(floor="1.00", gpus=4)
    await s.add_host("h2", gpus=4, floor="2.00")
    first = await s.bid(market="H100-80GB/spot", gpus=4, duration_s=3600, limit="3.00", requeue_on_preempt=True)
    await s.tick()
    s.clock.advance(4000)  # past the free window: the first lease is billed
    lease = (await leases(s))[0]
    await s.report(1, lease["gpu_uuids"], s.clock() - timedelta(seconds=3000), 3000)
    await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=4, host_id=lease["host_id"]))
    later = await s.bid(market="H100-80GB/spot", gpus=4, duration_s=3600, limit="3.00", coid="later")
    await s.tick()  # the later bid takes h2
    s.clock.advance(130)
    await s.tick()  # the notice ran out: lease 1 ends
    s.clock.advance(60)
    await _settle(s)  # closes lease 1 and requeues its bid

    bid = await s.ctx.pool.fetchrow("SELECT id, status FROM bids WHERE id = $1", first.id)
    assert bid["status"] == "open" and later.id > first.id
    from exchange.bids.service import bid_cost

    cost = await bid_cost(s.ctx, s.tenant_id, first.id)
    assert cost.leases == 1 and cost.preemptions == 1 and cost.charged != "0.00"
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
