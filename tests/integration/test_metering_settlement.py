"""Metering (stored once, only the host's own GPUs, never the future) and settlement (bills metered
GPU-seconds, exactly, once; releases the rest; silent hosts stop earning and fail)."""
from __future__ import annotations

from datetime import timedelta

import pytest

from exchange.core.errors import ApiError
from exchange.ledger.audit import run_audit
from exchange.leases.lifecycle import fail_silent_hosts
from exchange.settlement.service import settle
from tests.integration.scenario import START, Scenario


@pytest.fixture
async def scenario(db_url: str):
    s = await Scenario.create(db_url, fee_bps=100)
    yield s
    await s.close()


async def _settle(s: Scenario):
    async with s.ctx.pool.acquire() as conn:
        return await settle(conn, s.clock(), fee_bps=s.ctx.settings.fee_bps, max_gap_s=5.0, close_after_s=30)


async def _lease(s: Scenario) -> dict:
    return dict(await s.ctx.pool.fetchrow("SELECT * FROM leases ORDER BY id LIMIT 1"))


async def test_firm_lease_bills_metered_time_exactly_once(scenario: Scenario) -> None:
    # Arrange: a 2-GPU firm lease at 3.60/h (the floor: alone in the market), 10 minutes of samples.
    s = scenario
    await s.market(floor="3.60", firm_hours=24)
    await s.bid(market="H100-80GB/firm", gpus=2, duration_s=3600, limit="5.00")
    await s.tick()
    lease = await _lease(s)
    s.clock.advance(601)
    await s.report(1, lease["gpu_uuids"], START, 601)

    # Act: settle twice at the same moment.
    first = await _settle(s)
    second = await _settle(s)

    # Assert: 2 GPUs × 600 s covered = 1200 GPU-s × 3.60/h = 1.20; fee 1% to the exchange; once.
    lease = await _lease(s)
    assert lease["metered_gpu_s"] == 1200 and lease["billed_amount"] == 1_200_000
    assert (first.billed, second.billed) == (1, 0)
    assert await s.balances(s.owner_id) == {"available": 1_188_000, "held": 0}
    fees = await s.ctx.pool.fetchval("SELECT balance FROM ledger_accounts WHERE kind = 'fees'")
    assert fees == 12_000
    tenant = await s.balances(s.tenant_id)
    assert tenant["held"] == 2 * 3_600_000 - 1_200_000  # the hold narrowed to the firm price, less the bill
    async with s.ctx.pool.acquire() as conn:
        assert await run_audit(conn) == []


async def test_lease_end_bills_the_rest_then_releases_the_hold(scenario: Scenario) -> None:
    s = scenario
    await s.market(floor="3.60", firm_hours=24)
    await s.bid(market="H100-80GB/firm", gpus=1, duration_s=600, limit="5.00")
    await s.tick()
    lease = await _lease(s)
    s.clock.advance(700)
    await s.report(1, lease["gpu_uuids"], START, 700)  # samples run past the lease's end: not billed
    await s.tick()  # ends the lease at its planned end

    s.clock.advance(60)  # past close_after_s: the last samples are in
    await _settle(s)

    lease = await _lease(s)
    assert lease["status"] == "ended" and lease["closed"] and lease["hold_amount"] == 0
    assert lease["metered_gpu_s"] == 600 and lease["billed_amount"] == 600_000
    assert await s.balances(s.tenant_id) == {"available": 1_000_000_000 - 600_000, "held": 0}
    async with s.ctx.pool.acquire() as conn:
        assert await run_audit(conn) == []


async def test_replays_foreign_gpus_future_samples_are_refused_without_effect(scenario: Scenario) -> None:
    s = scenario
    await s.market()
    mine = s.uuids[:1]
    ack = await s.report(1, mine, START - timedelta(seconds=10), 10)

    replay = await s.report(1, mine, START - timedelta(seconds=10), 10)
    with pytest.raises(ApiError) as forged_replay:
        await s.report(1, mine, START - timedelta(seconds=20), 10)
    with pytest.raises(ApiError) as foreign:
        await s.report(2, ["GPU-9999-0000-0000-0000"], START, 5)
    with pytest.raises(ApiError) as future:
        await s.report(3, mine, START + timedelta(minutes=5), 5)

    assert ack.accepted == 10 and not ack.duplicate
    assert replay.duplicate and replay.accepted == 0
    assert forged_replay.value.status_code == 409 and forged_replay.value.code == "replayed_sequence"
    assert foreign.value.status_code == 422 and "not this host's" in foreign.value.message
    assert future.value.status_code == 422 and "future" in foreign.value.message + future.value.message
    assert await s.ctx.pool.fetchval("SELECT count(*) FROM meter_samples") == 10
    assert await s.ctx.pool.fetchval("SELECT count(*) FROM meter_reports") == 1


async def test_over_reporting_never_bills_beyond_wall_clock(scenario: Scenario) -> None:
    # Samples at 10 Hz on both GPUs, and samples from before the lease started.
    s = scenario
    await s.market(floor="3.60", firm_hours=24)
    await s.bid(market="H100-80GB/firm", gpus=2, duration_s=3600, limit="5.00")
    await s.tick()
    lease = await _lease(s)
    await s.report(1, lease["gpu_uuids"], START - timedelta(seconds=300), 300)
    s.clock.advance(120)
    await s.report(2, lease["gpu_uuids"], START, 120, every=0.1)

    await _settle(s)

    lease = await _lease(s)
    assert lease["metered_gpu_s"] <= 2 * 120 and lease["metered_gpu_s"] >= 2 * 119
    assert lease["billed_amount"] <= 2 * 120 * 3_600_000 // 3600


async def test_silent_host_stops_billing_at_last_sample_and_fails_later(scenario: Scenario) -> None:
    s = scenario
    await s.market(floor="3.60", firm_hours=24)
    await s.bid(market="H100-80GB/firm", gpus=1, duration_s=3600, limit="5.00")
    await s.tick()
    lease = await _lease(s)
    s.clock.advance(301)
    await s.report(1, lease["gpu_uuids"], START, 301)  # the agent dies after 5 minutes
    s.clock.advance(99)

    await _settle(s)
    silent_billed = (await _lease(s))["billed_amount"]
    async with s.ctx.pool.acquire() as conn:
        early = await fail_silent_hosts(conn, s.clock(), grace_s=30, fail_s=300)
        s.clock.advance(300)
        late = await fail_silent_hosts(conn, s.clock(), grace_s=30, fail_s=300)
    await _settle(s)

    lease = await _lease(s)
    assert silent_billed == 300_000  # 300 s at 3.60/h, nothing for the silence
    assert (early, late) == (0, 1)
    assert lease["status"] == "failed" and lease["end_reason"] == "host_failed"
    assert lease["end_at"] == START + timedelta(seconds=300)
    assert lease["billed_amount"] == 300_000 and lease["closed"]
    assert await s.balances(s.tenant_id) == {"available": 1_000_000_000 - 300_000, "held": 0}
    assert await s.ctx.pool.fetchval("SELECT count(*) FROM lease_gpus WHERE live") == 0


async def test_spot_lease_pays_the_spot_price_clamped_to_floor_and_limit(scenario: Scenario) -> None:
    s = scenario
    await s.market(floor="1.20")
    await s.bid(market="H100-80GB/spot", gpus=1, duration_s=3600, limit="3.00")
    await s.tick()
    lease = await _lease(s)
    s.clock.advance(361)
    await s.report(1, lease["gpu_uuids"], START, 361)

    await _settle(s)

    # Alone, the spot price is the floor, 1.20/h: 360 s = 0.12.
    assert (await _lease(s))["billed_amount"] == 120_000


async def test_a_lease_failing_at_a_fractional_second_still_closes(scenario: Scenario) -> None:
    # 4 GPUs sampled every 0.3 s; the host dies at 12.9 s. Billed before the failure: ~4 × 12.6 s.
    # The lease's wall clock must be floor(12.9 × 4) GPU-s, not floor(12.9) × 4 = 48 (below what
    # was billed, which the schema refuses: settlement would fail for ever, the hold never freed).
    s = scenario
    await s.market(floor="3.60", firm_hours=24)
    await s.bid(market="H100-80GB/firm", gpus=4, duration_s=3600, limit="5.00")
    await s.tick()
    lease = await _lease(s)
    s.clock.advance(13)
    await s.report(1, lease["gpu_uuids"], START, 13, every=0.3)
    await _settle(s)
    billed_before = (await _lease(s))["billed_gpu_s"]
    s.clock.advance(400)
    async with s.ctx.pool.acquire() as conn:
        assert await fail_silent_hosts(conn, s.clock(), grace_s=30, fail_s=300) == 1

    await _settle(s)

    final = await _lease(s)
    assert billed_before > 48 and final["status"] == "failed" and final["closed"] and final["hold_amount"] == 0
    assert final["billed_gpu_s"] >= billed_before
