"""Metering reports from host agents: each stored once (by host and sequence number), only for the
host's own GPUs, never from the future; samples go in through COPY."""
from __future__ import annotations

from datetime import timedelta

import asyncpg
import msgspec

from exchange.core import metrics
from exchange.core.auth import Principal
from exchange.core.bounds import EARLIEST_TIME
from exchange.core.context import AppContext, request_hash
from exchange.core.errors import ApiError, Conflict, InvalidField
from exchange.metering.schemas import MeterAck, MeterReport

_report_encoder = msgspec.json.Encoder()
# Clocks of hosts and exchange disagree a little; more than this ahead is a forged or broken clock.
MAX_CLOCK_SKEW = timedelta(seconds=5)
SAMPLE_COLUMNS = ("uuid", "ts", "host_id", "seq", "util", "mem_used_mb", "power_mw", "energy_mj", "temp_c", "healthy")


def _refuse(reason: str, error: ApiError) -> ApiError:
    metrics.METER_REFUSED.labels(reason).inc()
    return error


async def ingest_report(ctx: AppContext, principal: Principal, report: MeterReport) -> MeterAck:
    host_id = principal.host_id
    fingerprint = request_hash(_report_encoder.encode(report))
    now = ctx.clock()
    seen: set[tuple[str, object]] = set()
    for sample in report.samples:
        if sample.ts.tzinfo is None:
            raise _refuse("naive_time", InvalidField("samples", "ts must be an RFC 3339 time with a zone"))
        if sample.ts < EARLIEST_TIME:  # (the future is refused below)
            raise _refuse("past", InvalidField("samples", f"ts must be after {EARLIEST_TIME.isoformat()}"))
        if sample.ts > now + MAX_CLOCK_SKEW:
            raise _refuse("future", InvalidField("samples", f"sample of {sample.uuid} at {sample.ts.isoformat()} "
                                                             "is in the future"))
        key = (sample.uuid, sample.ts)
        if key in seen:
            raise _refuse("repeated_sample", InvalidField("samples", f"{sample.uuid} is sampled twice at one instant"))
        seen.add(key)
    uuids = sorted({s.uuid for s in report.samples})
    async with ctx.pool.acquire() as conn, conn.transaction():
        # One report of a host at a time, so that a replay racing its original is seen as a replay.
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", 0x6D74, host_id)
        known = await conn.fetchrow(
            "SELECT (SELECT content_hash FROM meter_reports WHERE host_id = $1 AND seq = $2) AS existing,"
            " ARRAY(SELECT uuid FROM gpus WHERE host_id = $1 AND uuid = ANY($3::text[])) AS own,"
            " (SELECT coalesce(max(seq), 0) + 1 FROM meter_reports WHERE host_id = $1) AS next_seq",
            host_id, report.seq, uuids)
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
        own = set(known["own"])
        foreign = [u for u in uuids if u not in own]
        if foreign:
            raise _refuse("foreign_gpu", InvalidField("samples", f"GPU {foreign[0]} is not this host's"))
        records = [(s.uuid, s.ts, host_id, report.seq, s.util, s.mem_used_mb, s.power_mw, s.energy_mj, s.temp_c,
                    s.healthy) for s in report.samples]
        accepted = await _store_samples(conn, records)
        latest = max((s.ts for s in report.samples), default=None)
        await conn.execute(
            "WITH report AS (INSERT INTO meter_reports (host_id, seq, content_hash, samples, received_at)"
            " VALUES ($1, $2, $3, $4, $5))"
            " UPDATE hosts SET last_seen_at = $5, health = 'ok', last_sample_at = greatest(last_sample_at, $6)"
            " WHERE id = $1", host_id, report.seq, fingerprint, accepted, now, latest)
    metrics.METER_SAMPLES.inc(accepted)
    return MeterAck(seq=report.seq, accepted=accepted, duplicate=False)


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
