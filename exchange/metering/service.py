"""Metering reports from host agents: each stored once (by host and sequence number), only for the
host's own GPUs; samples go in through COPY. Each sample is checked against physics and the host's
inventory (`exchange.metering.bounds`: never from the future, power within its model's bound, memory
within the GPU's, utilisation 0-100, a physical temperature, energy rising no faster than the card
can draw): the ones that break a bound are refused and counted by reason
(`gpux_meter_samples_refused_total`, and `refused`/`refused_reasons` in the answer), the others of
the same report kept. A report whose samples are all refused is refused whole (422)."""
from __future__ import annotations

from datetime import datetime, timedelta

import asyncpg
import msgspec

from exchange.core import metrics
from exchange.core.auth import Principal
from exchange.core.bounds import EARLIEST_TIME
from exchange.core.context import AppContext, request_hash
from exchange.core.errors import ApiError, Conflict, InvalidField
from exchange.metering import bounds
from exchange.metering.schemas import MeterAck, MeterReport, MeterSample

_report_encoder = msgspec.json.Encoder()
# Clocks of hosts and exchange disagree a little; more than this ahead is a forged or broken clock.
MAX_CLOCK_SKEW = timedelta(seconds=5)
SAMPLE_COLUMNS = ("uuid", "ts", "host_id", "seq", "util", "mem_used_mb", "power_mw", "energy_mj", "temp_c", "healthy")


def _refuse(reason: str, error: ApiError) -> ApiError:
    metrics.METER_REFUSED.labels(reason).inc()
    return error


# Stored samples around a report's, per GPU of this host: the last one before the report's first
# sample, any inside its span (a late report from a spool), and the first one after its last.
NEIGHBOURS_SQL = """
SELECT r.uuid, n.ts, n.energy_mj
FROM unnest($2::text[], $3::timestamptz[], $4::timestamptz[]) AS r(uuid, first_ts, last_ts)
CROSS JOIN LATERAL (
    (SELECT ts, energy_mj FROM meter_samples WHERE uuid = r.uuid AND host_id = $1 AND ts < r.first_ts
     ORDER BY ts DESC LIMIT 1)
    UNION ALL
    (SELECT ts, energy_mj FROM meter_samples WHERE uuid = r.uuid AND host_id = $1
     AND ts BETWEEN r.first_ts AND r.last_ts)
    UNION ALL
    (SELECT ts, energy_mj FROM meter_samples WHERE uuid = r.uuid AND host_id = $1 AND ts > r.last_ts
     ORDER BY ts LIMIT 1)
) n
"""


def _reading_refusal(sample: MeterSample, gpu: asyncpg.Record, latest_ts: datetime) -> str | None:
    """Why one reading on its own cannot be true of this GPU (None: it can)."""
    if sample.ts > latest_ts:
        return "future"
    if not bounds.UTIL_RANGE[0] <= sample.util <= bounds.UTIL_RANGE[1]:
        return "util_out_of_range"
    if not bounds.TEMP_RANGE_C[0] <= sample.temp_c <= bounds.TEMP_RANGE_C[1]:
        return "temp_out_of_range"
    if not 0 <= sample.power_mw <= bounds.power_bound_mw(gpu["model"]):
        return "power_above_bound" if sample.power_mw > 0 else "negative_reading"
    if not 0 <= sample.mem_used_mb <= gpu["memory_mb"]:
        return "memory_above_inventory" if sample.mem_used_mb > 0 else "negative_reading"
    if not 0 <= sample.energy_mj <= bounds.ENERGY_CEILING_MJ:
        return "energy_above_ceiling" if sample.energy_mj > 0 else "negative_reading"
    return None


def _rise_refused(earlier: tuple[datetime, int], later: tuple[datetime, int], bound_mw: int) -> bool:
    """A counter rising faster than the card can draw. One going down is a reset: allowed."""
    (ts0, e0), (ts1, e1) = earlier, later
    return e1 >= e0 and not bounds.energy_rise_allowed(e1 - e0, ts1 - ts0, bound_mw)


def _screen(samples: list[MeterSample], gpus: dict[str, asyncpg.Record], stored: dict[str, list[tuple]],
            latest_ts: datetime) -> tuple[list[MeterSample], dict[str, int]]:
    """The samples that hold against physics and the inventory, and the refused ones by reason.
    Energy is checked in time order per GPU against the sample before it (stored or kept from this
    report) and the stored one after it, so no pair of neighbours stored ever breaks the bounds."""
    refused: dict[str, int] = {}
    kept: set[int] = set()
    by_gpu: dict[str, list[tuple[datetime, int, int | None]]] = {}
    for i, sample in enumerate(samples):
        reason = _reading_refusal(sample, gpus[sample.uuid], latest_ts)
        if reason:
            refused[reason] = refused.get(reason, 0) + 1
        else:
            by_gpu.setdefault(sample.uuid, []).append((sample.ts, sample.energy_mj, i))
    for uuid, points in by_gpu.items():
        bound_mw = bounds.power_bound_mw(gpus[uuid]["model"])
        stored_at = {ts for ts, _ in stored.get(uuid, ())}
        # Stored points sort before new ones at the same instant; a new one there is stored already.
        timeline = sorted([(ts, e, None) for ts, e in stored.get(uuid, ())] + points,
                          key=lambda p: (p[0], p[2] is not None))
        # The next stored point after each position (one pass from the end).
        following_at: list[tuple[datetime, int] | None] = [None] * len(timeline)
        following: tuple[datetime, int] | None = None
        for n in range(len(timeline) - 1, -1, -1):
            following_at[n] = following
            if timeline[n][2] is None:
                following = timeline[n][:2]
        previous: tuple[datetime, int] | None = None
        for n, (ts, energy_mj, index) in enumerate(timeline):
            if index is None:
                previous = (ts, energy_mj)
                continue
            if ts in stored_at:
                kept.add(index)  # stored already (a re-numbered report): the store keeps the stored one
                continue
            following = following_at[n]
            if ((previous is not None and _rise_refused(previous, (ts, energy_mj), bound_mw))
                    or (following is not None and _rise_refused((ts, energy_mj), following, bound_mw))):
                refused["energy_rise_above_bound"] = refused.get("energy_rise_above_bound", 0) + 1
                continue
            kept.add(index)
            previous = (ts, energy_mj)
    for reason, count in refused.items():
        metrics.METER_SAMPLES_REFUSED.labels(reason).inc(count)
    return [s for i, s in enumerate(samples) if i in kept], refused


async def ingest_report(ctx: AppContext, principal: Principal, report: MeterReport) -> MeterAck:
    host_id = principal.host_id
    fingerprint = request_hash(_report_encoder.encode(report))
    now = ctx.clock()
    seen: set[tuple[str, object]] = set()
    first_last: dict[str, tuple[datetime, datetime]] = {}
    for sample in report.samples:
        if sample.ts.tzinfo is None:
            raise _refuse("naive_time", InvalidField("samples", "ts must be an RFC 3339 time with a zone"))
        if sample.ts < EARLIEST_TIME:  # (the future is refused per sample, below)
            raise _refuse("past", InvalidField("samples", f"ts must be after {EARLIEST_TIME.isoformat()}"))
        key = (sample.uuid, sample.ts)
        if key in seen:
            raise _refuse("repeated_sample", InvalidField("samples", f"{sample.uuid} is sampled twice at one instant"))
        seen.add(key)
        first, last = first_last.get(sample.uuid, (sample.ts, sample.ts))
        first_last[sample.uuid] = (min(first, sample.ts), max(last, sample.ts))
    uuids = sorted(first_last)
    async with ctx.pool.acquire() as conn, conn.transaction():
        # One report of a host at a time, so that a replay racing its original is seen as a replay
        # (and the energy check sees the samples of the report before).
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", 0x6D74, host_id)
        known = await conn.fetchrow(
            "SELECT (SELECT content_hash FROM meter_reports WHERE host_id = $1 AND seq = $2) AS existing,"
            " (SELECT coalesce(max(seq), 0) + 1 FROM meter_reports WHERE host_id = $1) AS next_seq",
            host_id, report.seq)
        existing = known["existing"]
        next_seq = known["next_seq"]
        if existing is not None:
            if existing == fingerprint:
                metrics.METER_REFUSED.labels("duplicate").inc()
                return MeterAck(seq=report.seq, accepted=0, duplicate=True)
            # An agent that lost its data dir restarts at 1: tell it where this host's numbers stand.
            # Gaps are accepted (a full spool drops its oldest reports), so it can skip ahead.
            raise _refuse("replayed_seq", Conflict("replayed_sequence",
                                                   f"report {report.seq} was received already with other samples",
                                                   field="seq", extra={"expected_seq": next_seq}))
        gpus = {r["uuid"]: r for r in await conn.fetch(
            "SELECT uuid, model, memory_mb FROM gpus WHERE host_id = $1 AND uuid = ANY($2::text[])", host_id, uuids)}
        foreign = [u for u in uuids if u not in gpus]
        if foreign:
            raise _refuse("foreign_gpu", InvalidField("samples", f"GPU {foreign[0]} is not this host's"))
        stored: dict[str, list[tuple]] = {}
        if uuids:
            for r in await conn.fetch(NEIGHBOURS_SQL, host_id, uuids, [first_last[u][0] for u in uuids],
                                      [first_last[u][1] for u in uuids]):
                stored.setdefault(r["uuid"], []).append((r["ts"], r["energy_mj"]))
        good, refused = _screen(report.samples, gpus, stored, now + MAX_CLOCK_SKEW)
        n_refused = sum(refused.values())
        if report.samples and not good:
            # Nothing to keep: refuse the report as a whole, storing nothing (not even its number).
            reason = max(refused, key=refused.get)
            raise _refuse("all_samples_refused", ApiError(
                "invalid_field", f"samples: all {n_refused} samples refused ({_describe(refused)})",
                field="samples", status=422, extra={"refused": n_refused, "refused_reasons": refused,
                                                     "reason": reason}))
        records = [(s.uuid, s.ts, host_id, report.seq, s.util, s.mem_used_mb, s.power_mw, s.energy_mj, s.temp_c,
                    s.healthy) for s in good]
        accepted = await _store_samples(conn, records)
        latest = max((s.ts for s in good), default=None)
        await conn.execute(
            "WITH report AS (INSERT INTO meter_reports (host_id, seq, content_hash, samples, received_at)"
            " VALUES ($1, $2, $3, $4, $5))"
            " UPDATE hosts SET last_seen_at = $5, health = 'ok', last_sample_at = greatest(last_sample_at, $6)"
            " WHERE id = $1", host_id, report.seq, fingerprint, accepted, now, latest)
    metrics.METER_SAMPLES.inc(accepted)
    return MeterAck(seq=report.seq, accepted=accepted, duplicate=False, refused=n_refused,
                    refused_reasons=dict(sorted(refused.items())))


def _describe(refused: dict[str, int]) -> str:
    return ", ".join(f"{count} {reason.replace('_', ' ')}" for reason, count in sorted(refused.items()))


async def _store_samples(conn: asyncpg.Connection, records: list[tuple]) -> int:
    """COPY straight into the table: a new report's samples are new. Only if some sample is stored
    already (a forged or re-numbered report) go the slower way, through the staging table, keeping
    what is stored and adding the rest."""
    if not records:
        return 0
    try:
        async with conn.transaction():  # a savepoint, so a conflict leaves the report's transaction usable
            await conn.copy_records_to_table("meter_samples", columns=SAMPLE_COLUMNS, records=records)
        return len(records)
    except asyncpg.UniqueViolationError:
        pass
    await conn.copy_records_to_table("meter_stage", columns=SAMPLE_COLUMNS, records=records)
    status = await conn.execute(
        f"INSERT INTO meter_samples ({', '.join(SAMPLE_COLUMNS)}) SELECT {', '.join(SAMPLE_COLUMNS)}"
        f" FROM meter_stage ON CONFLICT (uuid, ts) DO NOTHING")
    return int(status.rsplit(" ", 1)[-1])
