"""One auction tick: end what is due, sync the books, clear every market with the engine, and
persist the results (leases, trades, narrowed holds, prices, unfilled reasons) in one transaction."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg
import numpy as np

from exchange.auction.book_sync import BookSync, ModelState
from exchange.bids.service import close_bid, expire_bids
from exchange.core import metrics
from exchange.core.money import cost_micros
from exchange.leases.service import lock_lease_changes
from exchange.ledger import service as ledger
from exchange.markets.service import market_id
from exchange.reclaims.service import run_due_reclaims
from matching import Reason, Tier

log = logging.getLogger(__name__)
TIER_NAME = {Tier.FIRM: "firm", Tier.SPOT: "spot"}


@dataclass(frozen=True, slots=True)
class TickSummary:
    markets: int
    fills: int
    leases: int
    ended: int
    outbid: int
    hashes: dict[str, int]
    # market id -> market_ticks.id of this tick: the rows (trades, prices) a listener may read.
    tick_ids: dict[str, int]
    at: datetime


async def end_due_leases(conn: asyncpg.Connection, now: datetime) -> int:
    """Leases whose planned end, or whose notice, has run out stop holding their GPUs."""
    rows = await conn.fetch(
        "UPDATE leases SET status = 'ended', end_at = coalesce(end_at, planned_end_at),"
        " end_reason = coalesce(end_reason, 'completed')"
        " WHERE (status = 'active' AND planned_end_at <= $1) OR (status = 'ending' AND end_at <= $1) RETURNING id", now)
    if rows:
        await conn.execute("UPDATE lease_gpus SET live = false WHERE lease_id = ANY($1::bigint[]) AND live",
                           [r["id"] for r in rows])
    return len(rows)


async def run_tick(conn: asyncpg.Connection, sync: BookSync, now: datetime) -> TickSummary:
    started = time.perf_counter()
    await run_due_reclaims(conn, now)
    async with conn.transaction():
        await lock_lease_changes(conn)
        ended = await end_due_leases(conn, now)
        await expire_bids(conn, now)
    await sync.load_bid_changes(conn)
    await sync.load_blocks(conn, now)
    await sync.load_incumbents(conn)
    fills = leases = outbid = 0
    hashes: dict[str, int] = {}
    tick_ids: dict[str, int] = {}
    for model in sorted(sync.models):
        state = sync.models[model]
        result = state.book.tick(int(now.timestamp()))
        async with conn.transaction():
            await lock_lease_changes(conn)
            for tier in (Tier.FIRM, Tier.SPOT):
                tier_result = result.firm if tier == Tier.FIRM else result.spot
                tick_id, made, n_outbid = await _persist_tier(conn, state, tier, tier_result, now)
                if tick_id is not None:
                    tick_ids[market_id(model, TIER_NAME[tier])] = tick_id
                leases += made
                outbid += n_outbid
                fills += len(tier_result.fill_bid_id)
                hashes[market_id(model, TIER_NAME[tier])] = int(tier_result.state_hash)
        # Bids that filled or were cancelled as ioc left the book; the next load must not re-add them.
        await sync.load_bid_changes(conn)
    metrics.TICKS.inc()
    metrics.TICK_SECONDS.observe(time.perf_counter() - started)
    return TickSummary(markets=len(hashes), fills=fills, leases=leases, ended=ended, outbid=outbid, hashes=hashes,
                       tick_ids=tick_ids, at=now)


async def _persist_tier(conn: asyncpg.Connection, state: ModelState, tier: Tier, result,
                        now: datetime) -> tuple[int | None, int, int]:
    """Returns (market_ticks id, leases made, leases outbid)."""
    market = market_id(state.model, TIER_NAME[tier])
    if market not in state.markets:
        if not await conn.fetchval("SELECT 1 FROM markets WHERE id = $1", market):
            return None, 0, 0
        state.markets.add(market)
    price = int(result.price)
    indicative = int(result.indicative)
    volume = int(np.sum(result.fill_gpus)) if len(result.fill_gpus) else 0
    open_bids = sum(1 for t in state.resting.values() if t == tier)
    tick_id = await conn.fetchval(
        "INSERT INTO market_ticks (market, at, price, indicative, volume_gpus, open_bids, state_hash)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING id",
        market, now, price if price >= 0 else None, indicative, volume, open_bids,
        int(np.int64(np.uint64(int(result.state_hash) & 0xFFFF_FFFF_FFFF_FFFF))))
    made = 0
    fills_by_bid: dict[int, list[tuple[int, int]]] = {}
    for bid_id, block_id, gpus in zip(result.fill_bid_id, result.fill_block_id, result.fill_gpus):
        fills_by_bid.setdefault(int(bid_id), []).append((int(block_id), int(gpus)))
    for bid_id, blocks in fills_by_bid.items():
        made += await _open_leases(conn, bid_id, blocks, tier, market, price, tick_id, now)
    if price >= 0:
        await conn.execute("UPDATE markets SET last_price = $2, indicative_price = $3, last_trade_at = $4 WHERE id = $1",
                           market, price, indicative, now)
        metrics.FILLS.labels(market).inc(len(fills_by_bid))
    else:
        await conn.execute("UPDATE markets SET indicative_price = $2 WHERE id = $1", market, indicative)
    await _record_losers(conn, state, result, now)
    n_outbid = await _end_outbid(conn, result.outbid_lease_id, now) if tier == Tier.SPOT else 0
    metrics.OPEN_BIDS.labels(market).set(open_bids)
    return tick_id, made, n_outbid


async def _open_leases(conn: asyncpg.Connection, bid_id: int, blocks: list[tuple[int, int]], tier: Tier, market: str,
                       price: int, tick_id: int, now: datetime) -> int:
    """Turn one winning bid into leases (one per host it landed on), all or nothing, and narrow its
    hold to what the leases can cost: a firm lease its cleared price for the whole duration, a spot
    lease up to its limit (the spot price may rise to it)."""
    bid = await conn.fetchrow("SELECT * FROM bids WHERE id = $1 AND status = 'open' FOR UPDATE", bid_id)
    if bid is None:
        return 0
    gpus_total = sum(g for _, g in blocks)
    rate = price if tier == Tier.FIRM else bid["limit_price"]
    lease_hold_total = cost_micros(rate, gpus_total, bid["duration_s"])
    try:
        async with conn.transaction():  # a savepoint: a bid whose GPUs cannot be assigned stays open
            lease_ids = []
            held_so_far = 0
            for index, (offer_id, gpus) in enumerate(blocks):
                offer = await conn.fetchrow("SELECT host_id, model, floor_price FROM offers WHERE id = $1", offer_id)
                uuids = [r["uuid"] for r in await conn.fetch(
                    "SELECT g.uuid FROM gpus g WHERE g.host_id = $1 AND g.model = $2 AND g.present AND NOT EXISTS"
                    " (SELECT 1 FROM lease_gpus lg WHERE lg.uuid = g.uuid AND lg.live) ORDER BY g.idx LIMIT $3",
                    offer["host_id"], offer["model"], gpus)]
                if len(uuids) < gpus:
                    raise _Unassignable(offer_id)
                # Split the hold by GPUs; the last lease takes the remainder so the parts add up exactly.
                share = (lease_hold_total - held_so_far if index == len(blocks) - 1
                         else lease_hold_total * gpus // gpus_total)
                held_so_far += share
                lease_id = await conn.fetchval(
                    "INSERT INTO leases (bid_id, account_id, host_id, offer_id, market, tier, gpus, gpu_uuids, price,"
                    " limit_price, floor_price, start_at, planned_end_at, status, hold_amount, tick_id, created_at)"
                    " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,'active',$14,$15,$12) RETURNING id",
                    bid_id, bid["account_id"], offer["host_id"], offer_id, market, TIER_NAME[tier], gpus, uuids,
                    price, bid["limit_price"], offer["floor_price"], now,
                    now + timedelta(seconds=bid["duration_s"]), share, tick_id)
                await conn.executemany("INSERT INTO lease_gpus (lease_id, uuid) VALUES ($1, $2)",
                                       [(lease_id, u) for u in uuids])
                await conn.execute("INSERT INTO trades (market, tick_id, lease_id, price, gpus, duration_s, at)"
                                   " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                                   market, tick_id, lease_id, price, gpus, bid["duration_s"], now)
                lease_ids.append(lease_id)
            await conn.execute(
                "UPDATE bids SET status = 'filled', hold_amount = 0, filled_at = $2, updated_at = $2,"
                " unfilled_reason = NULL, unfilled_shortfall = NULL WHERE id = $1", bid_id, now)
            await ledger.release_hold(conn, account_id=bid["account_id"], amount=bid["hold_amount"] - lease_hold_total,
                                      now=now, ref_type="bid", ref_id=bid_id, kind="narrow")
    except _Unassignable as missing:
        log.warning("bid %s matched offer %s but its host has too few unleased GPUs", bid_id, missing.args[0])
        return 0
    return len(lease_ids)


class _Unassignable(Exception):
    pass


async def _record_losers(conn: asyncpg.Connection, state: ModelState, result, now: datetime) -> None:
    """Say why each resting bid did not fill (only when that changed), and cancel unfilled ioc bids."""
    changed = []
    for bid_id, code, shortfall in zip(result.loser_bid_id, result.loser_reason, result.loser_shortfall):
        bid_id = int(bid_id)
        reason = (Reason(int(code)).name.lower(), int(shortfall))
        if state.last_reason.get(bid_id) != reason:
            state.last_reason[bid_id] = reason
            changed.append((bid_id, reason[0], reason[1] if reason[1] > 0 else None))
        if bid_id in state.ioc:
            await close_bid(conn, bid_id, "cancelled", now)
    if changed:
        await conn.executemany(
            "UPDATE bids SET unfilled_reason = $2, unfilled_shortfall = $3 WHERE id = $1 AND status IN ('open', 'cancelled')",
            changed)


async def _end_outbid(conn: asyncpg.Connection, lease_ids, now: datetime) -> int:
    """A spot lease whose limit is below the new price ends after its offer's reclaim notice."""
    ids = [int(i) for i in lease_ids]
    if not ids:
        return 0
    await conn.execute(
        "UPDATE leases l SET status = 'ending', end_reason = 'outbid',"
        " end_at = $2::timestamptz + make_interval(secs => o.reclaim_notice_s)"
        " FROM offers o WHERE o.id = l.offer_id AND l.id = ANY($1::bigint[]) AND l.status = 'active'", ids, now)
    return len(ids)
