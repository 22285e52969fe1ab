"""One auction tick: end what is due, sync the books, clear every market with the engine, and
persist the results (leases, trades, narrowed holds, prices, unfilled reasons) in one transaction."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import datetime

import asyncpg
import numpy as np

from exchange.auction.book_sync import BookSync, ModelState
from exchange.bids import lifecycle as bid_lifecycle
from exchange.bids.lifecycle import BidEvent
from exchange.bids.service import close_bid, expire_bids
from exchange.core import metrics
from exchange.core.money import cost_micros, split_hold
from exchange.leases import lifecycle
from exchange.leases.lifecycle import LeaseEvent, lock_lease_changes
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
    return len(await lifecycle.end_due(conn, now))


async def run_tick(conn: asyncpg.Connection, sync: BookSync, now: datetime) -> TickSummary:
    started = time.perf_counter()
    # Due leases end first: a reservation that comes due now must not take (and call preempted) a
    # lease that has already run its course.
    async with conn.transaction():
        await lock_lease_changes(conn, now)
        ended = await end_due_leases(conn, now)
        await expire_bids(conn, now)
    await run_due_reclaims(conn, now)
    await sync.load_bid_changes(conn)
    await sync.load_blocks(conn, now)
    await sync.load_incumbents(conn)
    fills = leases = outbid = 0
    hashes: dict[str, int] = {}
    tick_ids: dict[str, int] = {}
    for model in sorted(sync.models):
        state = sync.models[model]
        result = state.book.tick(int(now.timestamp()))
        unplaced: list[int] = []
        try:
            async with conn.transaction():
                await lock_lease_changes(conn, now)
                model_ticks: dict[str, int] = {}
                for tier in (Tier.FIRM, Tier.SPOT):
                    tier_result = result.firm if tier == Tier.FIRM else result.spot
                    tick_id, made, n_outbid = await _persist_tier(conn, state, tier, tier_result, now, unplaced)
                    if tick_id is not None:
                        model_ticks[market_id(model, TIER_NAME[tier])] = tick_id
                    leases += made
                    outbid += n_outbid
                    fills += len(tier_result.fill_bid_id)
                    hashes[market_id(model, TIER_NAME[tier])] = int(tier_result.state_hash)
            tick_ids.update(model_ticks)
        except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
            sync.reset_model(model)
            raise
        except Exception:
            # The engine already took this tick's winners out of its book, but nothing of the tick
            # was written: the model's book is rebuilt from the database on the next load, so no
            # winner vanishes (its bid is still open there) and the next tick tries again.
            log.exception("persisting the %s tick failed; its book is rebuilt from the database", model)
            metrics.TICK_PERSIST_FAILURES.inc()
            sync.reset_model(model)
            continue
        if unplaced:
            # Winners whose GPUs could not be assigned stay open: back in the book for the next tick.
            await sync.reload_bids(conn, unplaced)
        # Bids that filled or were cancelled as ioc left the book; the next load must not re-add them.
        await sync.load_bid_changes(conn)
    metrics.TICKS.inc()
    metrics.TICK_SECONDS.observe(time.perf_counter() - started)
    return TickSummary(markets=len(hashes), fills=fills, leases=leases, ended=ended, outbid=outbid, hashes=hashes,
                       tick_ids=tick_ids, at=now)


async def _persist_tier(conn: asyncpg.Connection, state: ModelState, tier: Tier, result, now: datetime,
                        unplaced: list[int]) -> tuple[int | None, int, int]:
    """Returns (market_ticks id, leases made, leases outbid); winners that could not be placed are
    appended to `unplaced`."""
    market = market_id(state.model, TIER_NAME[tier])
    if market not in state.markets:
        if not await conn.fetchval("SELECT 1 FROM markets WHERE id = $1", market):
            return None, 0, 0
        state.markets.add(market)
    price = int(result.price)
    indicative = int(result.indicative)
    competing = int(result.competing_limit)
    volume = int(np.sum(result.fill_gpus)) if len(result.fill_gpus) else 0
    open_bids = sum(1 for t in state.resting.values() if t == tier)
    tick_id = await conn.fetchval(
        "INSERT INTO market_ticks (market, at, price, indicative, volume_gpus, open_bids, state_hash, competing_limit)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
        market, now, price if price >= 0 else None, indicative, volume, open_bids,
        int(np.int64(np.uint64(int(result.state_hash) & 0xFFFF_FFFF_FFFF_FFFF))), competing if competing >= 0 else None)
    made = 0
    fills_by_bid: dict[int, list[tuple[int, int]]] = {}
    for bid_id, block_id, gpus in zip(result.fill_bid_id, result.fill_block_id, result.fill_gpus):
        fills_by_bid.setdefault(int(bid_id), []).append((int(block_id), int(gpus)))
    for bid_id, blocks in fills_by_bid.items():
        opened = await _open_leases(conn, bid_id, blocks, tier, market, price, tick_id, now)
        if opened is None:
            unplaced.append(bid_id)
        else:
            made += opened
    if price >= 0:
        await conn.execute("UPDATE markets SET last_price = $2, indicative_price = $3, last_trade_at = $4 WHERE id = $1",
                           market, price, indicative, now)
        metrics.FILLS.labels(market).inc(len(fills_by_bid))
    else:
        await conn.execute("UPDATE markets SET indicative_price = $2 WHERE id = $1", market, indicative)
    await _record_losers(conn, state, result, now)
    n_outbid = 0
    if tier == Tier.SPOT:
        n_outbid = len(await lifecycle.give_notice(conn, [int(i) for i in result.outbid_lease_id],
                                                   LeaseEvent.OUTBID, now))
    metrics.OPEN_BIDS.labels(market).set(open_bids)
    return tick_id, made, n_outbid


async def _assignable_gpus(conn: asyncpg.Connection, host_id: int, model: str, gpus: int) -> list[str]:
    """`gpus` GPUs of the host that no live lease holds, or fewer when the host cannot give that
    many now: the block's free count was read before this transaction, and since then a reclaim may
    have taken GPUs (reclaims count GPUs per host, not by UUID), the host may have gone silent, or a
    GPU may have left its inventory. Runs under the lease-change lock, so what it sees stays true
    until commit."""
    rows = await conn.fetch(
        "SELECT g.uuid FROM gpus g JOIN hosts h ON h.id = g.host_id AND h.health = 'ok'"
        " WHERE g.host_id = $1 AND g.model = $2 AND g.present AND NOT EXISTS"
        " (SELECT 1 FROM lease_gpus lg WHERE lg.uuid = g.uuid AND lg.live) ORDER BY g.idx", host_id, model)
    # GPUs an active reclaim holds on this host that no live lease holds: the owner's, not for sale
    # (view reclaim_outstanding, the book's rule too).
    outstanding = await conn.fetchval(
        "SELECT coalesce((SELECT gpus FROM reclaim_outstanding WHERE host_id = $1 AND model = $2), 0)::int",
        host_id, model)
    usable = max(0, len(rows) - outstanding)
    return [r["uuid"] for r in rows[:min(gpus, usable)]]


async def _open_leases(conn: asyncpg.Connection, bid_id: int, blocks: list[tuple[int, int]], tier: Tier, market: str,
                       price: int, tick_id: int, now: datetime) -> int | None:
    """Turn one winning bid into leases (one per host it landed on), all or nothing, and narrow its
    hold to what the leases can cost: a firm lease its cleared price for the whole duration, a spot
    lease up to its limit (the spot price may rise to it). Returns the leases made, 0 when the bid
    is no longer open, None when its GPUs could not be assigned (it stays open)."""
    bid = await conn.fetchrow("SELECT * FROM bids WHERE id = $1 AND status = 'open' FOR UPDATE", bid_id)
    if bid is None:
        return 0
    rate = price if tier == Tier.FIRM else bid["limit_price"]
    lease_hold_total = cost_micros(rate, sum(g for _, g in blocks), bid["duration_s"])
    shares = split_hold(lease_hold_total, [g for _, g in blocks])
    try:
        async with conn.transaction():  # a savepoint: a bid whose GPUs cannot be assigned stays open
            lease_ids = []
            for (offer_id, gpus), share in zip(blocks, shares):
                offer = await conn.fetchrow("SELECT host_id, model, floor_price FROM offers WHERE id = $1", offer_id)
                uuids = await _assignable_gpus(conn, offer["host_id"], offer["model"], gpus)
                if len(uuids) < gpus:
                    raise _Unassignable(offer_id)
                lease_id = await lifecycle.insert_lease(
                    conn, bid_id=bid_id, account_id=bid["account_id"], host_id=offer["host_id"], offer_id=offer_id,
                    market=market, tier=TIER_NAME[tier], uuids=uuids, price=price, limit_price=bid["limit_price"],
                    floor_price=offer["floor_price"], start_at=now, duration_s=bid["duration_s"], hold_amount=share,
                    tick_id=tick_id)
                await conn.execute("INSERT INTO trades (market, tick_id, lease_id, price, gpus, duration_s, at)"
                                   " VALUES ($1, $2, $3, $4, $5, $6, $7)",
                                   market, tick_id, lease_id, price, gpus, bid["duration_s"], now)
                lease_ids.append(lease_id)
            await bid_lifecycle.apply(conn, bid_id, BidEvent.FILL, now)
            await ledger.release_hold(conn, account_id=bid["account_id"], amount=bid["hold_amount"] - lease_hold_total,
                                      now=now, ref_type="bid", ref_id=bid_id, kind="narrow")
    except _Unassignable as missing:
        log.warning("bid %s matched offer %s but its host has too few assignable GPUs", bid_id, missing.args[0])
        return None
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
