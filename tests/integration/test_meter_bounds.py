"""Issue 11: meter readings are checked against physics and the host's inventory. A sample that
breaks a bound is refused and counted, the good ones of its report are kept and billed; a sample
stored before the bounds existed (energy near 2^63) stops no lease, its own included, from settling,
closing and releasing its hold."""
from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from exchange.core import metrics
from exchange.core.errors import ApiError
from exchange.ledger.audit import run_audit
from exchange.hosts.service import host_earnings
from exchange.metering import bounds
from exchange.metering.schemas import MeterReport, MeterSample
from exchange.metering.service import ingest_report
from exchange.settlement.service import settle
from tests.integration.scenario import START, Scenario, owner

NEAR_2_63 = 9_000_000_000_000_000_000  # an energy reading near the top of bigint
POWER_MW = 650_000  # what the scenario's cards draw


async def _settle(s: Scenario):
    async with s.ctx.pool.acquire() as conn:
        return await settle(conn, s.clock(), fee_bps=0, max_gap_s=5.0, close_after_s=30)


def _sample(uuid: str, at: datetime, energy_mj: int, **reading: int) -> MeterSample:
    values = {"util": 95, "mem_used_mb": 70_000, "power_mw": POWER_MW, "temp_c": 70} | reading
    return MeterSample(uuid=uuid, ts=at, energy_mj=energy_mj, healthy=True, **values)


def _refused(reason: str) -> float:
    return metrics.METER_SAMPLES_REFUSED.labels(reason)._value.get()


async def _two_leases(s: Scenario) -> tuple[dict, dict]:
    """Two 2-GPU firm leases of 10 minutes at 3.60/h on one host, for two tenants."""
    await s.market(floor="3.60", firm_hours=24, gpus=4)
    other = await s.new_tenant("t2")
    await s.bid(market="H100-80GB/firm", gpus=2, duration_s=600, limit="5.00")
    await s.bid(market="H100-80GB/firm", gpus=2, duration_s=600, limit="5.00", tenant=other, coid="b2")
    await s.tick()
    first, second = [dict(r) for r in await s.ctx.pool.fetch("SELECT * FROM leases ORDER BY id")]
    return first, second


async def test_energy_near_2_63_is_refused_and_the_other_leases_settle(s: Scenario) -> None:
    # Arrange: two leases; two minutes of good samples on all four GPUs.
    first, second = await _two_leases(s)
    s.clock.advance(121)
    await s.report(1, s.uuids, START, 121)
    before = _refused("energy_above_ceiling")

    # Act: the agent reports energy near 2^63 on the first lease's GPUs, with one good sample.
    good = _sample(second["gpu_uuids"][0], START + timedelta(seconds=121), 1_000_000 + 121 * POWER_MW)
    ack = await ingest_report(s.ctx, s.agent, MeterReport(seq=2, samples=[
        _sample(u, START + timedelta(seconds=120.5), NEAR_2_63) for u in first["gpu_uuids"]] + [good]))

    # Assert: refused and counted; the good sample kept; every lease bills, ends, closes, releases.
    assert await s.ctx.pool.fetchval("SELECT max(energy_mj) FROM meter_samples") < NEAR_2_63
    assert (ack.accepted, ack.refused, ack.refused_reasons) == (1, 2, {"energy_above_ceiling": 2})
    assert _refused("energy_above_ceiling") == before + 2
    summary = await _settle(s)
    assert summary.failed == 0 and summary.billed == 2
    s.clock.advance(600)
    await s.tick()
    await _settle(s)
    rows = await s.ctx.pool.fetch("SELECT status, closed, hold_amount, billed_gpu_s, energy_mj FROM leases ORDER BY id")
    assert [(r["status"], r["closed"], r["hold_amount"]) for r in rows] == [("ended", True, 0)] * 2
    # The good sample of the same report (at 121 s) extends the second lease by one second.
    assert [r["billed_gpu_s"] for r in rows] == [240, 241]
    assert [r["energy_mj"] for r in rows] == [2 * 120 * POWER_MW, (2 * 120 + 1) * POWER_MW]
    async with s.ctx.pool.acquire() as conn:
        assert await run_audit(conn, now=s.clock()) == []


async def test_a_stored_overflowing_sample_stops_no_lease_from_settling(s: Scenario) -> None:
    # Arrange: samples stored before the bounds existed: energy near 2^63 on both GPUs of the first
    # lease (its energy, summed over its GPUs, is beyond bigint), inserted as the old ingest did.
    first, second = await _two_leases(s)
    s.clock.advance(121)
    await s.report(1, s.uuids, START, 121)
    await s.ctx.pool.executemany(
        "INSERT INTO meter_samples (uuid, ts, host_id, seq, util, mem_used_mb, power_mw, energy_mj, temp_c, healthy)"
        " VALUES ($1, $2, $3, 2, 95, 70000, 650000, $4, 70, true)",
        [(u, START + timedelta(seconds=120.5), s.agent.host_id, NEAR_2_63) for u in first["gpu_uuids"]])

    # Act: settle now, and after both leases ended.
    mid = await _settle(s)
    s.clock.advance(600)
    await s.tick()
    end = await _settle(s)

    # Assert: both leases billed for their metered time, closed, their holds released; the forged
    # jump counts no energy.
    assert (mid.failed, end.failed) == (0, 0)
    rows = await s.ctx.pool.fetch("SELECT status, closed, hold_amount, billed_gpu_s, energy_mj FROM leases ORDER BY id")
    assert [(r["status"], r["closed"], r["hold_amount"]) for r in rows] == [("ended", True, 0)] * 2
    # The first lease's forged samples (at 120.5 s) still mark time: 2 × 120.5 GPU-s.
    assert [r["billed_gpu_s"] for r in rows] == [241, 240]
    assert [r["energy_mj"] for r in rows] == [2 * 120 * POWER_MW] * 2
    assert await s.balances(s.tenant_id) == {"available": 1_000_000_000 - 241_000, "held": 0}
    earnings = await s.ctx.pool.fetchval("SELECT coalesce(sum(energy_mj), 0) FROM leases")
    assert earnings == 4 * 120 * POWER_MW
    # The audit names the stored samples that break the bounds, and only them.
    async with s.ctx.pool.acquire() as conn:
        breaches = dict(await run_audit(conn, now=s.clock()))
    assert list(breaches) == ["no stored meter sample breaks the meter bounds"]
    assert sorted(r["uuid"] for r in breaches["no stored meter sample breaks the meter bounds"]) == \
        sorted(first["gpu_uuids"])


async def test_samples_breaking_a_bound_are_refused_counted_and_the_rest_billed(s: Scenario) -> None:
    # Arrange: one 2-GPU lease; the H100's power bound is 700 W + 25 %; its memory 81,559 MB.
    await s.market(floor="3.60", firm_hours=24, gpus=2)
    await s.bid(market="H100-80GB/firm", gpus=2, duration_s=3600, limit="5.00")
    await s.tick()
    a, b = s.uuids
    s.clock.advance(61)
    at = [START + timedelta(seconds=i) for i in range(61)]
    energy = [1_000_000 + i * POWER_MW for i in range(61)]
    bad = {  # second -> (reading, reason); GPU a only
        10: ({"power_mw": bounds.power_bound_mw("H100-80GB") + 1}, "power_above_bound"),
        20: ({"mem_used_mb": 81_560}, "memory_above_inventory"),
        30: ({"util": 150}, "util_out_of_range"),
        40: ({"temp_c": 400}, "temp_out_of_range"),
    }
    before = {reason: _refused(reason) for _, reason in bad.values()} | {
        "energy_rise_above_bound": _refused("energy_rise_above_bound")}
    samples = []
    for i in range(61):
        samples.append(_sample(b, at[i], energy[i]))
        reading = bad.get(i, ({}, None))[0]
        # Second 50: GPU a's counter jumps by what 10 kW would draw in a second.
        samples.append(_sample(a, at[i], energy[i] + (10_000_000 if i == 50 else 0), **reading))

    # Act
    ack = await ingest_report(s.ctx, s.agent, MeterReport(seq=1, samples=samples))
    replay = await ingest_report(s.ctx, s.agent, MeterReport(seq=1, samples=samples))
    await _settle(s)

    # Assert: the replay is a duplicate (dedupe by host and seq holds), refusing nothing again.
    assert replay.duplicate and replay.accepted == 0 and replay.refused == 0
    # 5 refused, each counted by its reason; the 117 others stored and billed: GPU a's
    # coverage has gaps of 2 s where a sample was refused (each covers up to the next), so all
    # 60 s of each GPU are billed.
    assert ack.accepted == 117 and ack.refused == 5
    assert ack.refused_reasons == {"power_above_bound": 1, "memory_above_inventory": 1, "util_out_of_range": 1,
                                   "temp_out_of_range": 1, "energy_rise_above_bound": 1}
    for reason, count in before.items():
        assert _refused(reason) == count + 1, reason
    stored = await s.ctx.pool.fetchval("SELECT count(*) FROM meter_samples WHERE uuid = $1", a)
    assert stored == 56
    lease = dict(await s.ctx.pool.fetchrow("SELECT * FROM leases"))
    assert lease["metered_gpu_s"] == 120 and lease["billed_amount"] == 120_000
    # Energy: GPU b 60 s at 650 W; GPU a the same (its refused samples only join two rises).
    assert lease["energy_mj"] == 2 * 60 * POWER_MW
    async with s.ctx.pool.acquire() as conn:
        assert await run_audit(conn, now=s.clock()) == []


async def test_a_report_with_every_sample_refused_changes_nothing(s: Scenario) -> None:
    await s.market(gpus=1)
    with pytest.raises(ApiError) as refused:
        await ingest_report(s.ctx, s.agent, MeterReport(seq=1, samples=[
            _sample(s.uuids[0], START - timedelta(seconds=1), NEAR_2_63, util=150)]))
    assert refused.value.status_code == 422 and refused.value.field == "samples"
    assert refused.value.extra["refused_reasons"] == {"util_out_of_range": 1}
    assert await s.ctx.pool.fetchval("SELECT count(*) FROM meter_reports") == 0
    assert await s.ctx.pool.fetchval("SELECT last_sample_at FROM hosts") is None


async def test_a_counter_reset_counts_no_energy_and_never_over_counts(s: Scenario) -> None:
    # Arrange: the driver reloads at second 30: the counter restarts near 0.
    await s.market(floor="3.60", firm_hours=24, gpus=1)
    await s.bid(market="H100-80GB/firm", gpus=1, duration_s=3600, limit="5.00")
    await s.tick()
    (uuid,) = s.uuids
    s.clock.advance(61)
    samples = [_sample(uuid, START + timedelta(seconds=i),
                       5_000_000_000 + i * POWER_MW if i < 30 else (i - 30) * POWER_MW) for i in range(61)]

    # Act
    ack = await ingest_report(s.ctx, s.agent, MeterReport(seq=1, samples=samples))
    await _settle(s)

    # Assert: all kept; 29 + 30 rises of one second counted, none across the reset.
    assert ack.accepted == 61
    assert (await s.ctx.pool.fetchval("SELECT energy_mj FROM leases")) == 59 * POWER_MW


async def test_late_samples_are_checked_against_the_stored_ones_on_both_sides(s: Scenario) -> None:
    # Arrange: seconds 0-9 and 20-29 stored; the agent's spool sends 10-19 late.
    await s.market(gpus=1)
    (uuid,) = s.uuids

    def span(seq: int, seconds: range, zero_at: int | None = None) -> MeterReport:
        return MeterReport(seq=seq, samples=[
            _sample(uuid, START - timedelta(seconds=60 - i), 0 if i == zero_at else 1_000_000 + i * POWER_MW)
            for i in seconds])

    await ingest_report(s.ctx, s.agent, span(1, range(0, 10)))
    await ingest_report(s.ctx, s.agent, span(2, range(20, 30)))

    # Act: a late report whose last sample says the counter was reset to 0 at second 19. Against the
    # sample before it that is a reset (allowed), but second 20, stored, is 13 J above it: a rise
    # no card can draw in a second. Accepting it would leave a stored pair breaking the bounds.
    forged = await ingest_report(s.ctx, s.agent, span(3, range(10, 20), zero_at=19))

    # Assert: that sample alone refused; the rest of the gap filled.
    assert await s.ctx.pool.fetchval("SELECT count(*) FROM meter_samples") == 29
    assert (forged.accepted, forged.refused_reasons) == (9, {"energy_rise_above_bound": 1})


async def test_host_earnings_sum_energy_beyond_bigint(s: Scenario) -> None:
    # Two leases whose energy totals were stored near 2^63 (a one-GPU lease could store that before
    # the bounds): their sum is beyond bigint; the owner's earnings still answer.
    await _two_leases(s)
    await s.ctx.pool.execute("UPDATE leases SET energy_mj = $1", NEAR_2_63)

    earnings = await host_earnings(s.ctx, owner(s), s.agent.host_id)

    assert earnings.leases == 2 and earnings.energy_kwh == f"{2 * NEAR_2_63 / 3.6e9:.6f}"
