"""SPEC §4 on real PostgreSQL: a running spot lease is outbid only by a competing bid that needs
GPUs and pays more; another owner's ask (offer floor) that nobody accepts never ends it."""
from __future__ import annotations


from exchange.accounts.schemas import AccountCreate
from exchange.accounts.service import create_account
from tests.integration.scenario import Scenario

SPOT = "H100-80GB/spot"


async def lease_with_dear_offer_of_another_owner(s: Scenario) -> dict:
    """Owner A's 8-GPU host (floor 1.00) leased whole to a spot bid at 2.00; then owner B offers
    another 8-GPU host at a floor of 5.00.  Returns the lease."""
    await s.market(floor="1.00", gpus=8)
    await s.bid(market=SPOT, gpus=8, duration_s=3600, limit="2.00", coid="incumbent")
    await s.tick()
    owner_b = await create_account(s.ctx, AccountCreate(name="owner-b", role="owner"))
    s.owner_id = owner_b.id  # add_host publishes its offer for the scenario's current owner
    await s.add_host("h2", gpus=8, floor="5.00")
    s.clock.advance(5)
    return dict(await s.ctx.pool.fetchrow("SELECT * FROM leases"))


async def test_an_unaccepted_ask_above_the_lease_limit_does_not_end_it(s: Scenario) -> None:
    # Arrange
    lease = await lease_with_dear_offer_of_another_owner(s)
    assert lease["status"] == "active" and lease["tier"] == "spot"

    # Act: a tick with no competing bid; only owner B's 5.00 floor is above the lease's 2.00.
    summary = await s.tick()

    # Assert: the ask sets the indicative price, but the lease keeps its host.
    after = dict(await s.ctx.pool.fetchrow("SELECT * FROM leases WHERE id = $1", lease["id"]))
    indicative = await s.ctx.pool.fetchval("SELECT indicative_price FROM markets WHERE id = $1", SPOT)
    assert indicative == 5_000_000
    assert summary.outbid == 0
    assert after["status"] == "active" and after["end_reason"] is None and after["end_at"] == lease["end_at"]


async def test_a_competing_bid_that_pays_more_and_cannot_be_placed_outbids_it(s: Scenario) -> None:
    # Arrange: a rival wants 8 GPUs at 3.00: above the lease's 2.00, below owner B's 5.00 floor,
    # and owner A's GPUs are all leased, so it cannot be placed.
    lease = await lease_with_dear_offer_of_another_owner(s)
    rival = await s.new_tenant("rival")
    await s.bid(market=SPOT, gpus=8, duration_s=3600, limit="3.00", coid="rival", tenant=rival)

    # Act
    summary = await s.tick()

    # Assert
    after = dict(await s.ctx.pool.fetchrow("SELECT * FROM leases WHERE id = $1", lease["id"]))
    rows = await s.ctx.pool.fetch("SELECT status FROM bids WHERE client_order_id = 'rival'")
    assert [r["status"] for r in rows] == ["open"]
    assert summary.outbid == 1 and summary.fills == 0
    assert after["status"] == "ending" and after["end_reason"] == "outbid"


async def test_an_unaccepted_ask_never_sets_the_price_a_running_lease_pays(s: Scenario) -> None:
    # Arrange: the lease (floor 1.00, limit 2.00) and owner B's unaccepted 5.00 ask; the tick
    # publishes an indicative 5.00, nothing trades, no bid competes.
    from datetime import timedelta

    from exchange.settlement.service import settle
    from tests.integration.scenario import START

    lease = await lease_with_dear_offer_of_another_owner(s)
    await s.tick()
    s.clock.advance(95)

    # Act: the lease's first 100 s are metered and settled.
    await s.report(1, list(lease["gpu_uuids"]), START, 100)
    async with s.ctx.pool.acquire() as conn:
        await settle(conn, s.clock(), fee_bps=0, max_gap_s=5.0, close_after_s=30)

    # Assert: it pays its floor (no competing demand), not the ask clamped to its limit (2.00).
    after = await s.ctx.pool.fetchrow("SELECT billed_gpu_s, billed_amount FROM leases WHERE id = $1", lease["id"])
    assert after["billed_gpu_s"] == 8 * 99  # the last sample has no successor to bound it yet
    assert after["billed_amount"] == 8 * 99 * 1_000_000 // 3600
    assert lease["start_at"] + timedelta(seconds=100) == s.clock()
