"""Settlement: bills each lease's *metered* GPU-seconds at the price in force, from the tenant's
hold to the owner, less the exchange fee; releases what is left of the hold once a lease is over.

Idempotent by construction: each run recomputes a lease's metered GPU-seconds from the stored
samples and bills only what was not billed yet, so a second run at the same moment moves nothing.

- A GPU-second is metered when a healthy sample covers it: each healthy sample covers the time up
  to that GPU's next sample, at most `meter_max_gap_s`, clipped to the lease's window. A host that
  goes silent therefore stops earning at its last sample, and samples that arrive late (from an
  agent's spool after an outage) are billed when they arrive.
- Firm leases pay their cleared price; spot leases pay the market's spot price at each settlement
  (the last tick's clearing price, else its indicative price), clamped to [their floor, their limit].
- Money is exact: `billed_value` accumulates price × GPU-seconds, and the amount billed so far is
  floor(billed_value / 3600) micro-dollars, so rounding never accumulates across runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from exchange.core import metrics
from exchange.ledger import service as ledger

SETTLE_LOCK_KEY = 0x6770_7578_0003

# Per lease and GPU: the samples inside the window (plus the first one after it, which bounds the
# last sample's coverage); coverage and energy summed per lease.
METERED_SQL = """
WITH win AS (
    SELECT l.id, u.uuid, l.start_at,
           least(coalesce(l.end_at, l.planned_end_at), l.planned_end_at, $1::timestamptz) AS stop
    FROM leases l, unnest(l.gpu_uuids) AS u(uuid)
    WHERE l.id = ANY($2::bigint[])
), s AS (
    SELECT w.id, w.uuid, w.stop, ms.ts, ms.healthy, ms.energy_mj,
           lead(ms.ts) OVER (PARTITION BY w.id, w.uuid ORDER BY ms.ts) AS next_ts
    FROM win w JOIN meter_samples ms
      ON ms.uuid = w.uuid AND ms.ts >= w.start_at AND ms.ts < w.stop + make_interval(secs => $3)
), per_gpu AS (
    SELECT id, uuid,
           coalesce(sum(CASE WHEN healthy AND ts < stop AND next_ts IS NOT NULL THEN
               extract(epoch FROM least(next_ts, ts + make_interval(secs => $3), stop) - ts) END), 0) AS covered_s,
           coalesce(max(energy_mj) FILTER (WHERE ts < stop) - min(energy_mj) FILTER (WHERE ts < stop), 0) AS energy_mj
    FROM s GROUP BY id, uuid
)
SELECT id, floor(sum(covered_s))::bigint AS covered_s, sum(energy_mj)::bigint AS energy_mj FROM per_gpu GROUP BY id
"""


PREEMPTIONS = ("reclaimed", "outbid", "host_failed")


def _refund(lease, fees_book: int) -> ledger.TransferSpec:
    """Give back what a lease that turned out free was billed: to its hold, which closing releases."""
    billed, fees = lease["billed_amount"], lease["fees_amount"]
    return ledger.TransferSpec(kind="refund", account_id=lease["account_id"], ref_type="lease", ref_id=lease["id"],
                               memo="reclaimed within the free window",
                               postings=[(lease["owner_book"], -(billed - fees)), (fees_book, -fees),
                                         (lease["tenant_held"], billed)])


async def requeue_preempted(conn: asyncpg.Connection, lease_id: int, now: datetime) -> bool:
    """Put a preempted lease's bid back in the book with its original priority (its id is its time
    priority), once every lease of its gang is closed, holding its full cost again. A tenant that
    can no longer cover it is told why; the bid stays filled."""
    from exchange.bids.service import requeue_bid

    bid_id = await conn.fetchval(
        "UPDATE leases SET requeued_at = $2 WHERE id = $1 RETURNING bid_id", lease_id, now)
    still_running = await conn.fetchval(
        "SELECT count(*) FROM leases WHERE bid_id = $1 AND NOT closed AND id <> $2", bid_id, lease_id)
    if still_running:
        return False
    return await requeue_bid(conn, bid_id, now)


@dataclass(frozen=True, slots=True)
class SettleSummary:
    leases: int
    billed: int
    charged_micros: int
    closed: int
    seconds: float


def _stop(lease: asyncpg.Record, now: datetime) -> datetime:
    return min(lease["end_at"] or lease["planned_end_at"], lease["planned_end_at"], now)


async def spot_prices(conn: asyncpg.Connection) -> dict[str, int]:
    """The spot price in force per market: the last tick's clearing price, else its indicative."""
    rows = await conn.fetch(
        "SELECT DISTINCT ON (market) market, coalesce(price, indicative) AS price FROM market_ticks"
        " WHERE market LIKE '%/spot' ORDER BY market, id DESC")
    return {r["market"]: r["price"] for r in rows}


async def settle(conn: asyncpg.Connection, now: datetime, *, fee_bps: int, max_gap_s: float,
                 close_after_s: float, batch: int = 2000) -> SettleSummary:
    """Bill every open lease up to `now`. Only one settlement runs at a time (advisory lock); a
    lease is closed (rest of hold released) once it is over and `close_after_s` have passed for its
    last samples to arrive."""
    started = time.perf_counter()
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", SETTLE_LOCK_KEY):
        return SettleSummary(0, 0, 0, 0, 0.0)
    try:
        prices = await spot_prices(conn)
        fees_book = await ledger.system_book(conn, "fees")
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM leases WHERE NOT closed ORDER BY id")]
        leases = billed = charged = closed = 0
        for i in range(0, len(ids), batch):
            n, b, c, k = await _settle_batch(conn, ids[i:i + batch], now, prices, fees_book, fee_bps, max_gap_s,
                                             close_after_s)
            leases += n
            billed += b
            charged += c
            closed += k
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", SETTLE_LOCK_KEY)
    metrics.SETTLED_MICROS.inc(charged)
    return SettleSummary(leases, billed, charged, closed, time.perf_counter() - started)


async def _settle_batch(conn, ids, now, prices, fees_book, fee_bps, max_gap_s, close_after_s):
    billed = charged = closed = 0
    async with conn.transaction():
        rows = await conn.fetch(
            "SELECT l.*, h.owner_id, oa.id AS owner_book, ta.id AS tenant_held, tv.id AS tenant_available"
            " FROM leases l JOIN hosts h ON h.id = l.host_id"
            " JOIN ledger_accounts oa ON oa.account_id = h.owner_id AND oa.kind = 'available'"
            " JOIN ledger_accounts ta ON ta.account_id = l.account_id AND ta.kind = 'held'"
            " JOIN ledger_accounts tv ON tv.account_id = l.account_id AND tv.kind = 'available'"
            " WHERE l.id = ANY($1::bigint[]) AND NOT l.closed ORDER BY l.id FOR UPDATE OF l", ids)
        metered = {r["id"]: r for r in await conn.fetch(METERED_SQL, now, ids, float(max_gap_s))}
        updates = []
        transfers: list[ledger.TransferSpec] = []
        requeue: list[int] = []
        for lease in rows:
            stop = _stop(lease, now)
            # floor(seconds × GPUs), not floor(seconds) × GPUs: a lease ending at a fractional second
            # (a failed host's last sample) would otherwise cap below what was already billed.
            wall_clock = max(0, int((stop - lease["start_at"]).total_seconds() * lease["gpus"]))
            m = metered.get(lease["id"])
            # Metered time never goes down: what is billed stays billed.
            metered_s = max(min(m["covered_s"] if m else 0, wall_clock), lease["billed_gpu_s"])
            delta = max(0, metered_s - lease["billed_gpu_s"])
            price = lease["price"]
            if lease["tier"] == "spot":
                price = min(max(prices.get(lease["market"], price), lease["floor_price"]), lease["limit_price"])
            if lease["free_of_charge"]:
                # Reclaimed within the owner's free window: the reclaim costs the owner, not the tenant.
                price = 0
                if lease["billed_amount"] > 0:
                    transfers.append(_refund(lease, fees_book))
                    lease = {**dict(lease), "hold_amount": lease["hold_amount"] + lease["billed_amount"],
                             "billed_amount": 0, "fees_amount": 0, "billed_value": 0}
            value = int(lease["billed_value"]) + price * delta
            charge = min(value // 3600 - lease["billed_amount"], lease["hold_amount"])
            fee = charge * fee_bps // 10_000
            if charge > 0:
                transfers.append(ledger.TransferSpec(
                    kind="settle", account_id=lease["account_id"], ref_type="lease", ref_id=lease["id"],
                    memo=f"{delta} GPU-s at {price}",
                    postings=[(lease["tenant_held"], -charge), (lease["owner_book"], charge - fee), (fees_book, fee)]))
                billed += 1
                charged += charge
            hold_left = lease["hold_amount"] - charge
            over = lease["status"] in ("ended", "failed") and now >= stop + timedelta(seconds=close_after_s)
            if over and hold_left > 0:
                transfers.append(ledger.TransferSpec(
                    kind="release", account_id=lease["account_id"], ref_type="lease", ref_id=lease["id"],
                    postings=[(lease["tenant_held"], -hold_left), (lease["tenant_available"], hold_left)]))
            closed += over
            if over and lease["end_reason"] in PREEMPTIONS and lease["requeued_at"] is None:
                requeue.append(lease["id"])
            updates.append((lease["id"], metered_s, lease["billed_gpu_s"] + delta, value,
                            lease["billed_amount"] + charge, lease["fees_amount"] + fee,
                            0 if over else hold_left, m["energy_mj"] if m else lease["energy_mj"], now, over))
        await ledger.post_transfers(conn, transfers, now)
        for lease_id in requeue:
            await requeue_preempted(conn, lease_id, now)
        await conn.executemany(
            "UPDATE leases SET metered_gpu_s = $2, billed_gpu_s = $3, billed_value = $4, billed_amount = $5,"
            " fees_amount = $6, hold_amount = $7, energy_mj = greatest(energy_mj, $8), settled_at = $9, closed = $10"
            " WHERE id = $1", updates)
    return len(rows), billed, charged, closed
