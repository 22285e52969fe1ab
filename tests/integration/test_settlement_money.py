"""Settlement to the micro-dollar, on real PostgreSQL through the real services on a ManualClock:
each scenario checks the lease's columns and the ledger's balances (tenant available/held, owner
available, the fees book) against amounts worked out by hand.

Prices are micro-dollars per GPU-hour, so a bill is floor(Σ price × GPU-s / 3600) and its fee
floor(bill × fee_bps / 10 000), both on running totals."""
from __future__ import annotations

from datetime import timedelta

import pytest
from prometheus_client import REGISTRY

from exchange.accounts.schemas import DepositCreate
from exchange.accounts.service import deposit
from exchange.core.auth import Principal
from exchange.ledger import service as ledger
from exchange.ledger.audit import run_audit
from exchange.reclaims.schemas import ReclaimCreate
from exchange.reclaims.service import create_reclaim
from exchange.settlement.service import settle
from tests.integration.scenario import START, Scenario

FEE_BPS = 100
FUNDS = 1_000_000_000  # the scenario's 1000.00 deposit


@pytest.fixture
async def s(db_url: str):
    scenario = await Scenario.create(db_url, fee_bps=FEE_BPS)
    yield scenario
    await scenario.close()


async def _settle(s: Scenario, **kw):
    async with s.ctx.pool.acquire() as conn:
        return await settle(conn, s.clock(), fee_bps=s.ctx.settings.fee_bps,
                            max_gap_s=s.ctx.settings.meter_max_gap_s, close_after_s=30, **kw)


async def _leases(s: Scenario) -> list[dict]:
    return [dict(r) for r in await s.ctx.pool.fetch("SELECT * FROM leases ORDER BY id")]


async def _fees(s: Scenario) -> int:
    return await s.ctx.pool.fetchval("SELECT balance FROM ledger_accounts WHERE kind = 'fees'")


async def _audit_clean(s: Scenario) -> None:
    async with s.ctx.pool.acquire() as conn:
        assert await run_audit(conn) == []


def _money(lease: dict) -> tuple[int, int, int, int]:
    return lease["billed_gpu_s"], int(lease["billed_value"]), lease["billed_amount"], lease["fees_amount"]


async def _tick_price(s: Scenario, *, price: int | None, indicative: int) -> None:
    """A spot tick recorded by hand: moves the spot price in force (read by `spot_prices`). With no
    trade, `indicative` stands for the highest competing limit."""
    await s.ctx.pool.execute(
        "INSERT INTO market_ticks (market, at, price, indicative, volume_gpus, open_bids, state_hash, competing_limit)"
        " VALUES ('H100-80GB/spot', $1, $2, $3, 0, 0, 0, $4)", s.clock(), price, indicative,
        None if price is not None else indicative)


async def _payout(s: Scenario, account_id: int) -> int:
    """The account's whole available balance leaves the exchange (a payout to the world book)."""
    async with s.ctx.pool.acquire() as conn, conn.transaction():
        world = await ledger.system_book(conn, "world")
        books = await ledger.books_of(conn, account_id)
        amount = await conn.fetchval("SELECT balance FROM ledger_accounts WHERE id = $1", books.available)
        await ledger.post_transfer(conn, kind="withdrawal", account_id=account_id, now=s.clock(),
                                   postings=[(books.available, -amount), (world, amount)])
    return amount


async def test_an_uneven_price_settled_nine_times_bills_like_one_settlement(s: Scenario) -> None:
    # Arrange: a 1-GPU firm lease at 1.234567/h (the floor: alone in the market).
    await s.market(floor="1.234567", firm_hours=24)
    await s.bid(market="H100-80GB/firm", gpus=1, duration_s=3600, limit="5.00")
    await s.tick()
    lease = (await _leases(s))[0]
    assert (lease["price"], lease["hold_amount"]) == (1_234_567, 1_234_567)

    # Act: nine runs, 100 more seconds of samples before each.
    for k in range(9):
        s.clock.advance(100)
        await s.report(k + 1, lease["gpu_uuids"], START + timedelta(seconds=100 * k), 100)
        await _settle(s)

    # Assert: 899 GPU-s (the last sample covers nothing yet) settled as if at once:
    # 899 × 1 234 567 = 1 109 875 733; / 3600 = 308 298.8 -> 308 298; fee 1% = 3 082.98 -> 3 082
    # (a fee floored per run took 339 + 8 × 342 = 3 075).
    lease = (await _leases(s))[0]
    assert _money(lease) == (899, 1_109_875_733, 308_298, 3_082)
    assert lease["hold_amount"] == 1_234_567 - 308_298
    assert await s.balances(s.tenant_id) == {"available": FUNDS - 1_234_567, "held": 1_234_567 - 308_298}
    assert await s.balances(s.owner_id) == {"available": 308_298 - 3_082, "held": 0}
    assert await _fees(s) == 3_082
    await _audit_clean(s)


async def test_a_moving_spot_price_is_clamped_to_the_floor_and_the_limit(s: Scenario) -> None:
    # Arrange: a spot lease, floor 1.20, limit 3.00; alone, it clears at the floor. Its hold is at
    # its limit: 3.00 for the hour.
    await s.market(floor="1.20")
    await s.bid(market="H100-80GB/spot", gpus=1, duration_s=3600, limit="3.00")
    await s.tick()
    uuids = (await _leases(s))[0]["gpu_uuids"]

    # Act: 100 s at each spot price in force: 1.20 (the tick), 2.00, 5.00 (over the limit) and an
    # competing limit of 0.50 with no trade (under the floor).
    for k, tick in enumerate([None, (2_000_000, 2_000_000), (5_000_000, 5_000_000), (None, 500_000)]):
        if tick:
            await _tick_price(s, price=tick[0], indicative=tick[1])
        s.clock.advance(100)
        await s.report(k + 1, uuids, START + timedelta(seconds=100 * k), 100)
        await _settle(s)

    # Assert: 99 × 1.20 + 100 × 2.00 + 100 × 3.00 + 100 × 1.20 (GPU-s × $/h):
    # 118 800 000 + 200 000 000 + 300 000 000 + 120 000 000 = 738 800 000 -> 205 222; fee 2 052.
    lease = (await _leases(s))[0]
    assert _money(lease) == (399, 738_800_000, 205_222, 2_052)
    assert await s.balances(s.tenant_id) == {"available": FUNDS - 3_000_000, "held": 3_000_000 - 205_222}
    assert await s.balances(s.owner_id) == {"available": 205_222 - 2_052, "held": 0}
    assert await _fees(s) == 2_052
    await _audit_clean(s)


async def test_unhealthy_samples_and_long_gaps_are_not_billed(s: Scenario) -> None:
    await s.market(floor="3.60", firm_hours=24)
    await s.bid(market="H100-80GB/firm", gpus=1, duration_s=3600, limit="5.00")
    await s.tick()
    uuids = (await _leases(s))[0]["gpu_uuids"]
    s.clock.advance(400)
    await s.report(1, uuids, START, 100)                                           # 0..99 healthy
    await s.report(2, uuids, START + timedelta(seconds=100), 100, healthy=False)    # 100..199 unhealthy
    await s.report(3, uuids, START + timedelta(seconds=300), 100, every=10)        # 300, 310, ..., 390

    await _settle(s)

    # 100 s (0..99, the last up to the unhealthy sample at 100) + nothing while unhealthy, nothing
    # for the silence 200..299 + 9 samples 10 s apart covering the meter's max gap (5 s) each = 145.
    lease = (await _leases(s))[0]
    assert lease["metered_gpu_s"] == 145
    assert _money(lease) == (145, 145 * 3_600_000, 145_000, 1_450)
    assert await s.balances(s.tenant_id) == {"available": FUNDS - 3_600_000, "held": 3_600_000 - 145_000}
    assert await s.balances(s.owner_id) == {"available": 143_550, "held": 0}
    assert await _fees(s) == 1_450
    await _audit_clean(s)


async def test_a_free_reclaim_refunds_the_tenant_in_full_fee_included(s: Scenario) -> None:
    # Arrange: a spot lease at 3.60 billed 600 s (0.60, of which 0.006 in fees), then reclaimed
    # within the owner's free window.
    await s.market(floor="3.60")
    await s.bid(market="H100-80GB/spot", gpus=1, duration_s=7200, limit="5.00")
    await s.tick()
    uuids = (await _leases(s))[0]["gpu_uuids"]
    s.clock.advance(601)
    await s.report(1, uuids, START, 601)
    await _settle(s)
    assert _money((await _leases(s))[0]) == (600, 600 * 3_600_000, 600_000, 6_000)
    assert (await s.balances(s.owner_id))["available"] == 594_000 and await _fees(s) == 6_000

    await create_reclaim(s.ctx, Principal(role="owner", account_id=s.owner_id), ReclaimCreate(model="H100-80GB", gpus=8))
    s.clock.advance(200)  # the notice (120 s) runs out
    await s.report(2, uuids, START + timedelta(seconds=601), 199)
    await s.tick()
    s.clock.advance(60)

    # Act
    await _settle(s)

    # Assert: the tenant has its 1000.00 back whole; owner and fees book are back to zero.
    lease = (await _leases(s))[0]
    assert (lease["free_of_charge"], lease["status"], lease["closed"]) == (True, "ended", True)
    assert (lease["billed_value"], lease["billed_amount"], lease["fees_amount"], lease["hold_amount"]) == (0, 0, 0, 0)
    assert await s.balances(s.tenant_id) == {"available": FUNDS, "held": 0}
    assert await s.balances(s.owner_id) == {"available": 0, "held": 0}
    assert await _fees(s) == 0
    await _audit_clean(s)


async def test_back_filled_samples_are_billed_at_the_next_run_and_once(s: Scenario) -> None:
    await s.market(floor="3.60", firm_hours=24)
    await s.bid(market="H100-80GB/firm", gpus=1, duration_s=3600, limit="5.00")
    await s.tick()
    uuids = (await _leases(s))[0]["gpu_uuids"]
    s.clock.advance(300)
    await s.report(1, uuids, START, 100)  # the agent's spool holds 100..299 during an outage
    await _settle(s)
    assert _money((await _leases(s))[0]) == (99, 99 * 3_600_000, 99_000, 990)

    await s.report(2, uuids, START + timedelta(seconds=100), 200)  # the spool drains
    later = await _settle(s)
    again = await _settle(s)

    lease = (await _leases(s))[0]
    assert (later.billed, again.billed, again.charged_micros) == (1, 0, 0)
    assert _money(lease) == (299, 299 * 3_600_000, 299_000, 2_990)
    assert await s.balances(s.tenant_id) == {"available": FUNDS - 3_600_000, "held": 3_600_000 - 299_000}
    assert await s.balances(s.owner_id) == {"available": 296_010, "held": 0}
    assert await _fees(s) == 2_990
    await _audit_clean(s)


async def test_samples_of_the_lease_gpu_from_another_host_are_not_billed(s: Scenario) -> None:
    # Defect 12: samples were joined to leases by GPU UUID alone.
    await s.market(floor="3.60", firm_hours=24)
    h2_agent, _ = await s.add_host("h2", floor="3.60", firm_hours=24)
    await s.bid(market="H100-80GB/firm", gpus=1, duration_s=3600, limit="5.00")
    await s.tick()
    lease = (await _leases(s))[0]
    agent = s.agent if lease["host_id"] == s.agent.host_id else h2_agent
    other_host = h2_agent.host_id if agent is s.agent else s.agent.host_id
    s.clock.advance(600)
    await s.report(1, lease["gpu_uuids"], START, 300, agent=agent)  # 0..299, then the host goes quiet
    # The same GPU UUID reported by another host for 300..599 (as if the card had moved).
    await s.ctx.pool.executemany(
        "INSERT INTO meter_samples (uuid, ts, host_id, seq, util, mem_used_mb, power_mw, energy_mj, temp_c, healthy)"
        " VALUES ($1, $2, $3, 1, 95, 70000, 650000, $4, 70, true)",
        [(lease["gpu_uuids"][0], START + timedelta(seconds=t), other_host, 5_000_000_000 + t * 650_000)
         for t in range(300, 600)])

    await _settle(s)

    lease = (await _leases(s))[0]
    assert lease["metered_gpu_s"] == 299 and _money(lease) == (299, 299 * 3_600_000, 299_000, 2_990)
    assert lease["energy_mj"] == 299 * 650_000  # the lease's own host's energy counter only
    assert await s.balances(s.owner_id) == {"available": 296_010, "held": 0}
    assert await _fees(s) == 2_990


@pytest.mark.parametrize("batch", [2000, 1])
async def test_a_preempted_gang_is_requeued_once_its_last_lease_closes(s: Scenario, batch: int) -> None:
    # Defect 4: each lease of a gang saw its siblings still open (they were marked closed only after
    # the loop), so a multi-lease gang's bid was never requeued. With batch=1 the two leases settle
    # in separate transactions: the second to close requeues.
    await s.market(floor="1.00", gpus=8)
    await s.add_host("h2", gpus=8, floor="1.00")
    bid = await s.bid(market="H100-80GB/spot", gpus=12, duration_s=3600, limit="3.00", requeue_on_preempt=True)
    await s.tick()
    gang = await _leases(s)
    assert len(gang) == 2 and sum(le["gpus"] for le in gang) == 12
    await create_reclaim(s.ctx, Principal(role="owner", account_id=s.owner_id),
                         ReclaimCreate(model="H100-80GB", gpus=2, host_id=gang[0]["host_id"]))
    s.clock.advance(121)
    await s.tick()  # the notice ran out: the whole gang ends
    assert {(le["status"], le["end_reason"]) for le in await _leases(s)} == {("ended", "reclaimed")}
    s.clock.advance(60)

    summary = await _settle(s, batch=batch)

    gang = await _leases(s)
    assert summary.closed == 2 and all(le["closed"] and le["requeued_at"] is not None for le in gang)
    row = await s.ctx.pool.fetchrow("SELECT status, hold_amount FROM bids WHERE id = $1", bid.id)
    hold = 3_000_000 * 12  # its full cost again: 12 GPUs for an hour at its limit
    assert (row["status"], row["hold_amount"]) == ("open", hold)
    assert await s.balances(s.tenant_id) == {"available": FUNDS - hold, "held": hold}
    await _audit_clean(s)


async def test_a_lease_that_fails_to_settle_does_not_stop_the_others(s: Scenario) -> None:
    # Defect 11: one batch was one transaction, so one failing lease stopped all settlement. Here
    # a free reclaim's refund fails because its owner was paid out in between (an owner's book
    # cannot go negative); a firm lease of the same owner must still bill and close.
    await s.market(floor="3.60", firm_hours=24)
    await s.bid(market="H100-80GB/spot", gpus=1, duration_s=7200, limit="5.00", coid="spot")
    await s.bid(market="H100-80GB/firm", gpus=1, duration_s=900, limit="5.00", coid="firm")
    await s.tick()
    spot, firm = sorted(await _leases(s), key=lambda le: le["tier"] != "spot")
    uuids = spot["gpu_uuids"] + firm["gpu_uuids"]
    s.clock.advance(601)
    await s.report(1, uuids, START, 601)
    await _settle(s)  # 600 GPU-s each: 0.60 billed each, 0.594 to the owner each
    assert await _payout(s, s.owner_id) == 2 * 594_000
    await create_reclaim(s.ctx, Principal(role="owner", account_id=s.owner_id),
                         ReclaimCreate(model="H100-80GB", gpus=7))  # 6 idle GPUs + the spot lease's
    s.clock.advance(699)
    await s.report(2, uuids, START + timedelta(seconds=601), 699)
    await s.tick()  # both end: the spot lease's notice ran out, the firm lease is due
    s.clock.advance(60)
    failures = REGISTRY.get_sample_value("gpux_settle_failures_total") or 0

    # Act
    summary = await _settle(s)

    # Assert: the refund (0.594 back from the owner, who has at most 0.297) fails alone and is
    # counted; the firm lease bills its last 300 s (0.297 to the owner, 0.003 in fees) and closes.
    by_id = {le["id"]: le for le in await _leases(s)}
    assert (summary.leases, summary.failed, summary.closed) == (2, 1, 1)
    assert REGISTRY.get_sample_value("gpux_settle_failures_total") == failures + 1
    assert _money(by_id[firm["id"]]) == (900, 900 * 3_600_000, 900_000, 9_000)
    assert by_id[firm["id"]]["closed"] and by_id[firm["id"]]["hold_amount"] == 0
    assert _money(by_id[spot["id"]]) == (600, 600 * 3_600_000, 600_000, 6_000)  # untouched, for the next run
    assert not by_id[spot["id"]]["closed"]
    assert await s.balances(s.owner_id) == {"available": 297_000, "held": 0}
    assert await _fees(s) == 6_000 + 9_000

    # The next run retries it: once the owner's book covers the refund, it goes through.
    await deposit(s.ctx, s.owner_id, DepositCreate(amount="0.297", idempotency_key="top-up"))
    retry = await _settle(s)

    assert (retry.failed, retry.closed) == (0, 1)
    spot = dict(await s.ctx.pool.fetchrow("SELECT * FROM leases WHERE id = $1", spot["id"]))
    assert spot["closed"] and (spot["billed_amount"], spot["fees_amount"], spot["hold_amount"]) == (0, 0, 0)
    assert await s.balances(s.tenant_id) == {"available": FUNDS - 900_000, "held": 0}
    assert await s.balances(s.owner_id) == {"available": 0, "held": 0}
    assert await _fees(s) == 9_000
    await _audit_clean(s)
