"""Settlement: bills each lease's *metered* GPU-seconds at the price in force, from the tenant's
hold to the owner, less the exchange fee; releases what is left of the hold once a lease is over.

Idempotent by construction: each run recomputes a lease's metered GPU-seconds from the stored
samples and bills only what was not billed yet, so a second run at the same moment moves nothing.

- A GPU-second is metered when a healthy sample covers it: each healthy sample covers the time up
  to that GPU's next sample, at most `meter_max_gap_s`, clipped to the lease's window. A host that
  goes silent therefore stops earning at its last sample, and samples that arrive late (from an
  agent's spool after an outage) are billed when they arrive.
- A lease's energy is the sum of its GPUs' energy-counter rises between consecutive samples, each
  counted only within the meter bounds (`exchange.metering.bounds`): a reset counts nothing, a
  forged jump stored before ingest checked the bounds counts nothing and stops no lease.
- Firm leases pay their cleared price; spot leases pay the market's spot price at each settlement
  (the last tick's clearing price, else its highest competing limit, never an unaccepted ask:
  `spot_prices`), clamped to [their floor, their limit].
- Money is exact: `billed_value` accumulates price × GPU-seconds, and the amount billed so far is
  floor(billed_value / 3600) micro-dollars, and the fee floor(billed × fee_bps / 10 000), so
  rounding never accumulates across runs (the arithmetic: `exchange.settlement.billing`).
- Each lease settles on its own: one that fails (missing books, a refund its owner cannot cover, a
  row the schema refuses) is rolled back alone, logged and counted, and retried at the next run.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from exchange.core import metrics
from exchange.ledger import service as ledger
from exchange.metering import bounds
from exchange.leases.lifecycle import PREEMPTION_REASONS, TERMINAL, lock_lease_changes
from exchange.settlement import billing

log = logging.getLogger(__name__)

SETTLE_LOCK_KEY = 0x6770_7578_0003

# Per lease and GPU: the samples of the lease's own host inside the window (plus the first one
# after it, which bounds the last sample's coverage); coverage and energy summed per lease. A GPU
# UUID is matched on its host too: a GPU moved to another host earns nothing for this lease there.
# Energy is the sum of the counter's rises between consecutive samples in the window, each counted
# only when the card could have drawn it (`exchange.metering.bounds`; ingest refuses the others, but
# samples stored before it did may break them): a counter reset (a fall) counts nothing, a forged
# jump counts nothing, and a lease's energy stays within its GPUs' power bound times its duration.
# Sums stay numeric (never cast to bigint here): an overflow then fails that lease's write alone.
METERED_SQL = f"""
WITH win AS (
    SELECT l.id, l.host_id, u.uuid, l.start_at,
           least(coalesce(l.end_at, l.planned_end_at), l.planned_end_at, $1::timestamptz) AS stop,
           {bounds.bound_sql('g.model')} AS bound_mw
    FROM leases l CROSS JOIN unnest(l.gpu_uuids) AS u(uuid) LEFT JOIN gpus g ON g.uuid = u.uuid
    WHERE l.id = ANY($2::bigint[])
), s AS (
    SELECT w.id, w.uuid, w.stop, w.bound_mw, ms.ts, ms.healthy, ms.energy_mj,
           lead(ms.ts) OVER (PARTITION BY w.id, w.uuid ORDER BY ms.ts) AS next_ts,
           lag(ms.ts) OVER (PARTITION BY w.id, w.uuid ORDER BY ms.ts) AS prev_ts,
           ms.energy_mj::numeric - lag(ms.energy_mj::numeric) OVER (PARTITION BY w.id, w.uuid ORDER BY ms.ts) AS rise
    FROM win w JOIN meter_samples ms
      ON ms.uuid = w.uuid AND ms.host_id = w.host_id
     AND ms.ts >= w.start_at AND ms.ts < w.stop + make_interval(secs => $3)
), per_gpu AS (
    SELECT id, uuid,
           coalesce(sum(CASE WHEN healthy AND ts < stop AND next_ts IS NOT NULL THEN
               extract(epoch FROM least(next_ts, ts + make_interval(secs => $3), stop) - ts) END), 0) AS covered_s,
           coalesce(sum(rise) FILTER (WHERE ts < stop AND rise >= 0
                                       AND {bounds.rise_allowed_sql('rise', 'prev_ts', 'ts', 'bound_mw')}), 0)
               AS energy_mj
    FROM s GROUP BY id, uuid
)
SELECT id, floor(sum(covered_s)) AS covered_s, sum(energy_mj) AS energy_mj FROM per_gpu GROUP BY id
"""

# The lease rows of a batch, locked, with the books their money moves between. Outer joins: a lease
# whose books are missing fails (and is counted) instead of silently never settling.
LEASES_SQL = (
    "SELECT l.*, h.owner_id, oa.id AS owner_book, ta.id AS tenant_held, tv.id AS tenant_available"
    " FROM leases l JOIN hosts h ON h.id = l.host_id"
    " LEFT JOIN ledger_accounts oa ON oa.account_id = h.owner_id AND oa.kind = 'available'"
    " LEFT JOIN ledger_accounts ta ON ta.account_id = l.account_id AND ta.kind = 'held'"
    " LEFT JOIN ledger_accounts tv ON tv.account_id = l.account_id AND tv.kind = 'available'"
    " WHERE l.id = ANY($1::bigint[]) AND NOT l.closed ORDER BY l.id FOR UPDATE OF l")

UPDATE_SQL = (
    "UPDATE leases SET metered_gpu_s = $2, billed_gpu_s = $3, billed_value = $4, billed_amount = $5,"
    " fees_amount = $6, hold_amount = $7, energy_mj = greatest(energy_mj, $8), settled_at = $9, closed = $10"
    " WHERE id = $1")

# The bids to put back in the book now: a `requeue_on_preempt` bid still filled, with a preempted
# lease not yet requeued and no lease left open (the gang's last lease to close requeues it). Runs
# after this write's `closed` is stored, so it sees it; locks the bids before any ledger posting
# (global order: bids before ledger accounts).
REQUEUE_SQL = (
    "SELECT b.id FROM bids b WHERE b.id = ANY($1::bigint[]) AND b.requeue_on_preempt AND b.status = 'filled'"
    " AND NOT EXISTS (SELECT 1 FROM leases l WHERE l.bid_id = b.id AND NOT l.closed)"
    " AND EXISTS (SELECT 1 FROM leases l WHERE l.bid_id = b.id AND l.requeued_at IS NULL"
    "             AND l.end_reason = ANY($2::text[]))"
    " ORDER BY b.id FOR UPDATE OF b")


@dataclass(frozen=True, slots=True)
class SettleSummary:
    leases: int
    billed: int
    charged_micros: int
    closed: int
    seconds: float
    failed: int = 0


@dataclass(frozen=True, slots=True)
class LeasePlan:
    """What one run writes for one lease: its new row values and its transfers."""
    lease_id: int
    bid_id: int
    update: tuple
    transfers: list[ledger.TransferSpec]
    charge_micros: int
    closing: bool


def _stop(lease: asyncpg.Record, now: datetime) -> datetime:
    return min(lease["end_at"] or lease["planned_end_at"], lease["planned_end_at"], now)


async def spot_prices(conn: asyncpg.Connection) -> dict[str, int]:
    """The spot price in force per market: the last tick's clearing price, else its highest
    competing limit (a losing bid's), else 0 (no demand: running leases pay their floor). Never the
    indicative price: an ask nobody accepted never sets what a running lease pays (SPEC §4). The one
    place settlement reads it."""
    rows = await conn.fetch(
        "SELECT DISTINCT ON (market) market, coalesce(price, competing_limit, 0) AS price FROM market_ticks"
        " WHERE market LIKE '%/spot' ORDER BY market, id DESC")
    return {r["market"]: r["price"] for r in rows}


async def settle(conn: asyncpg.Connection, now: datetime, *, fee_bps: int, max_gap_s: float,
                 close_after_s: float, batch: int = 2000) -> SettleSummary:
    """Bill every open lease up to `now`. Only one settlement runs at a time (advisory lock); a
    lease is closed (rest of hold released) once it is over and `close_after_s` have passed for its
    last samples to arrive. A lease that fails to settle is logged, counted
    (`gpux_settle_failures_total`) and left for the next run; the others settle."""
    started = time.perf_counter()
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1)", SETTLE_LOCK_KEY):
        return SettleSummary(0, 0, 0, 0, 0.0)
    try:
        prices = await spot_prices(conn)
        fees_book = await ledger.system_book(conn, "fees")
        ids = [r["id"] for r in await conn.fetch("SELECT id FROM leases WHERE NOT closed ORDER BY id")]
        leases = billed = charged = closed = failed = 0
        for i in range(0, len(ids), batch):
            n, b, c, k, f = await _settle_batch(conn, ids[i:i + batch], now, prices, fees_book, fee_bps,
                                                max_gap_s, close_after_s)
            leases += n
            billed += b
            charged += c
            closed += k
            failed += f
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", SETTLE_LOCK_KEY)
    metrics.SETTLED_MICROS.inc(charged)
    return SettleSummary(leases, billed, charged, closed, time.perf_counter() - started, failed)


def _plan(lease: asyncpg.Record, metered: asyncpg.Record | None, now: datetime, prices: dict[str, int],
          fees_book: int, fee_bps: int, close_after_s: float) -> LeasePlan:
    stop = _stop(lease, now)
    wall_clock = billing.wall_clock_gpu_s((stop - lease["start_at"]).total_seconds(), lease["gpus"])
    metered_s = billing.metered_gpu_s(covered_gpu_s=int(metered["covered_s"]) if metered else 0,
                                      wall_clock=wall_clock, billed_gpu_s=lease["billed_gpu_s"])
    price = billing.price_in_force(tier=lease["tier"], cleared_micros_per_h=lease["price"],
                                   spot_micros_per_h=prices.get(lease["market"]),
                                   floor_micros_per_h=lease["floor_price"], limit_micros_per_h=lease["limit_price"])
    closing = lease["status"] in TERMINAL and now >= stop + timedelta(seconds=close_after_s)
    prev = billing.LeaseBill(billed_gpu_s=lease["billed_gpu_s"], value=int(lease["billed_value"]),
                             billed_micros=lease["billed_amount"], fees_micros=lease["fees_amount"],
                             hold_micros=lease["hold_amount"])
    delta = metered_s - lease["billed_gpu_s"]
    b = billing.bill(prev, delta_gpu_s=delta, price_micros_per_h=price, fee_bps=fee_bps,
                     free_of_charge=lease["free_of_charge"], closing=closing)
    ref = {"account_id": lease["account_id"], "ref_type": "lease", "ref_id": lease["id"]}
    transfers = []
    if b.refund_micros:
        transfers.append(ledger.TransferSpec(
            kind="refund", memo="reclaimed within the free window", **ref,
            postings=[(lease["owner_book"], -(b.refund_micros - b.refund_fee_micros)),
                      (fees_book, -b.refund_fee_micros), (lease["tenant_held"], b.refund_micros)]))
    if b.charge_micros:
        transfers.append(ledger.TransferSpec(
            kind="settle", memo=f"{delta} GPU-s at {price}", **ref,
            postings=[(lease["tenant_held"], -b.charge_micros),
                      (lease["owner_book"], b.charge_micros - b.fee_micros), (fees_book, b.fee_micros)]))
    if b.release_micros:
        transfers.append(ledger.TransferSpec(
            kind="release", **ref,
            postings=[(lease["tenant_held"], -b.release_micros), (lease["tenant_available"], b.release_micros)]))
    t = b.totals
    energy_mj = int(metered["energy_mj"]) if metered else lease["energy_mj"]
    update = (lease["id"], metered_s, t.billed_gpu_s, t.value, t.billed_micros, t.fees_micros, t.hold_micros,
              energy_mj, now, closing)
    return LeasePlan(lease_id=lease["id"], bid_id=lease["bid_id"], update=update, transfers=transfers,
                     charge_micros=b.charge_micros, closing=closing)


async def _settle_batch(conn, ids, now, prices, fees_book, fee_bps, max_gap_s, close_after_s):
    async with conn.transaction():
        # Global lock order: lease changes (advisory) -> bids -> leases -> ledger accounts, as the
        # tick and cancel take them. Requeued bids are locked after the lease rows, which is safe
        # only because every transaction that changes leases holds the advisory lock first.
        await lock_lease_changes(conn, now)
        rows = await conn.fetch(LEASES_SQL, ids)
        metered = {r["id"]: r for r in await conn.fetch(METERED_SQL, now, [r["id"] for r in rows],
                                                       float(max_gap_s))}
        plans: list[LeasePlan] = []
        failed = 0
        for lease in rows:
            try:
                plans.append(_plan(lease, metered.get(lease["id"]), now, prices, fees_book, fee_bps, close_after_s))
            except Exception:
                failed += 1
                _count_failure(lease["id"])
        done, not_done = await _apply(conn, plans, now)
    billed = sum(1 for p in done if p.charge_micros > 0)
    charged = sum(p.charge_micros for p in done)
    closed = sum(1 for p in done if p.closing)
    return len(rows), billed, charged, closed, failed + len(not_done)


def _count_failure(lease_id: int) -> None:
    log.exception("settlement of lease %s failed; it is left for the next run", lease_id)
    metrics.SETTLE_FAILURES.inc()


async def _apply(conn: asyncpg.Connection, plans: list[LeasePlan], now: datetime
                 ) -> tuple[list[LeasePlan], list[LeasePlan]]:
    """Write the plans in bulk under a savepoint; when that fails, split them in halves and retry
    each, down to the single lease that fails, which is rolled back alone. One failing lease costs
    about 2·log2(batch) bulk writes; the others still settle. Returns (written, failed)."""
    if not plans:
        return [], []
    try:
        async with conn.transaction():
            await _write(conn, plans, now)
        return plans, []
    except Exception:
        if conn.is_closed():
            raise  # the connection is gone, not the lease
        if len(plans) == 1:
            _count_failure(plans[0].lease_id)
            return [], plans
    mid = len(plans) // 2
    done_a, failed_a = await _apply(conn, plans[:mid], now)
    done_b, failed_b = await _apply(conn, plans[mid:], now)
    return done_a + done_b, failed_a + failed_b


async def _write(conn: asyncpg.Connection, plans: list[LeasePlan], now: datetime) -> None:
    # 1. The lease rows (already locked), `closed` included, so the requeue check below sees it.
    await conn.executemany(UPDATE_SQL, [p.update for p in plans])
    # 2. Bids to requeue, locked before any ledger posting.
    closing_bids = sorted({p.bid_id for p in plans if p.closing})
    requeue = []
    if closing_bids:
        requeue = [r["id"] for r in await conn.fetch(REQUEUE_SQL, closing_bids, list(PREEMPTION_REASONS))]
        if requeue:
            await conn.execute(
                "UPDATE leases SET requeued_at = $2 WHERE bid_id = ANY($1::bigint[]) AND requeued_at IS NULL"
                " AND end_reason = ANY($3::text[])", requeue, now, list(PREEMPTION_REASONS))
    # 3. The money: bills, refunds, releases (the release frees the funds the requeued hold needs).
    await ledger.post_transfers(conn, [t for p in plans for t in p.transfers], now)
    # Transfers are checked balanced at commit (a deferred constraint): check them now, inside this
    # savepoint, so an unbalanced one fails its own lease rather than the whole batch at commit.
    await conn.execute("SET CONSTRAINTS transfers_balanced IMMEDIATE; SET CONSTRAINTS transfers_balanced DEFERRED")
    # 4. Back in the book, with their original priority, holding their full cost again.
    if requeue:
        from exchange.bids.service import requeue_bid

        for bid_id in requeue:
            await requeue_bid(conn, bid_id, now)
