"""A quote: a dry run of a bid against the current book. Would these terms fill if the market
cleared now, at what price, on how many eligible GPUs, and if not, why and by how much.

It runs the tick's own clearing, not a second copy of the rule: the book is assembled by the
auction's loader (BookSync.load_model: the tick's queries, so the same free GPUs, reclaims and
reservations) into a fresh engine book (matching.ModelBook, so the same eligibility, priority
walk, price and reasons), the terms are added as the newest bid, and one tick is run on that copy.
It lives in the bids slice, beside placing a bid, because it answers a tenant about its own bid;
it only borrows the auction's loader. It never touches the leader's live book: this process may
not be the leader, and the leader's engine keeps state between ticks that a bid that does not
exist must not enter. The read is one REPEATABLE READ, read-only snapshot, so the bids, the
supply and the balance are of one moment, and nothing is written.

What the answer can tell a tenant about others (the public book already lists every open bid's
limit price and GPUs per market, and every free ask's floor): the price is always one of those
public levels or the tenant's own limit (the rule's price is a losing limit, a floor or a winning
limit); the shortfall is such a level minus the tenant's own limit. What the public book does not
show, and probing quotes with varied terms can narrow down, is which of those bids would be
eligible and win against these terms (so, coarsely, other bids' gang sizes and durations) and
how the free supply splits by reclaim notice, survival and firm window (eligible_gpus). It shows
no bid, lease, host or account of anyone, and nothing of running spot leases: their limits only
decide who is outbid, which a quote neither computes nor says.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from exchange.auction.book_sync import TIER_OF, BookSync
from exchange.bids.schemas import Quote, QuoteRequest
from exchange.bids.service import unknown_market, validate_bid
from exchange.core.context import AppContext
from exchange.core.money import cost_micros, format_money
from exchange.ledger import service as ledger
from matching import ModelBook, Reason, Tier, hazard_budget_from_survival

# The reason when the balance cannot cover the hold: placing the bid would be refused with this
# error code (402), so it would never rest, let alone fill.
INSUFFICIENT_FUNDS = "insufficient_funds"
# Quotes computed at once per server process (each holds a pooled connection while it reads).
QUOTES_AT_ONCE = 2


@dataclass(frozen=True, slots=True)
class Clearing:
    """The quoted bid's part of one clearing: micro-dollars per GPU-hour, GPU counts."""
    filled: bool
    price_micros: int | None
    eligible_gpus: int
    reason: str | None
    shortfall_micros: int | None


async def quote_bid(ctx: AppContext, account_id: int, data: QuoteRequest) -> Quote:
    now = ctx.clock()
    limit_micros = validate_bid(ctx, data, now)  # the same refusals as placing the bid
    hold_micros = cost_micros(limit_micros, data.gpus, data.duration_s)
    # A quote reads and rebuilds its model's whole book (~0.5 s with 100,000 open bids in it): a
    # burst of quotes waits here rather than take every core and pooled connection of the process.
    slots = ctx.extras.setdefault("quote_slots", asyncio.Semaphore(QUOTES_AT_ONCE))
    async with slots:
        async with ctx.pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            market = await conn.fetchrow("SELECT model, tier FROM markets WHERE id = $1", data.market)
            if market is None:
                raise unknown_market(data.market)
            available_micros = (await ledger.balances(conn, account_id)).get("available", 0)
            state = await BookSync().load_model(conn, market["model"], now)
        # Newer than every bid in this book: last in time priority (as a bid placed now would be),
        # and an id no bid of the book has.
        quote_bid_id = max(state.resting, default=0) + 1
        # Off the event loop, like the book's building: the tick's cost grows with the book too.
        clearing = await asyncio.to_thread(clear_with, state.book, TIER_OF[market["tier"]], quote_bid_id, data,
                                           limit_micros, int(now.timestamp()))
    if available_micros < hold_micros:
        filled, price, reason, shortfall = False, None, INSUFFICIENT_FUNDS, hold_micros - available_micros
    else:
        filled, price, reason, shortfall = (clearing.filled, clearing.price_micros, clearing.reason,
                                            clearing.shortfall_micros)
    return Quote(market=data.market, gpus=data.gpus, duration_s=data.duration_s,
                 limit_price=format_money(limit_micros), would_fill=filled,
                 price=None if price is None else format_money(price), eligible_gpus=clearing.eligible_gpus,
                 unfilled_reason=reason, unfilled_shortfall=None if shortfall is None else format_money(shortfall),
                 hold=format_money(hold_micros), available=format_money(available_micros), at=now)


def clear_with(book: ModelBook, tier: Tier, bid_id: int, terms: QuoteRequest, limit_micros: int,
               now_s: int) -> Clearing:
    """Add the terms to `book` (a fresh copy, spent by this call) as bid `bid_id` and clear it once;
    read off the bid's fill or its unfilled reason exactly as the tick records them
    (auction.service: _persist_tier, _record_losers)."""
    budget = hazard_budget_from_survival(terms.min_survival)
    eligible_gpus = book.eligible_free(tier, now_s, terms.duration_s, terms.min_notice_s, budget)
    one = np.array([bid_id], dtype=np.int64)
    book.add_bids(tier, bid_id=one, seq=one, gpus=np.array([terms.gpus]), duration_s=np.array([terms.duration_s]),
                  limit=np.array([limit_micros]), hazard_budget=np.array([budget]),
                  min_notice_s=np.array([terms.min_notice_s]))
    result = book.tick(now_s)
    mine = result.firm if tier == Tier.FIRM else result.spot
    if np.any(mine.fill_bid_id == bid_id):  # a gang fills whole or not at all
        return Clearing(filled=True, price_micros=int(mine.price), eligible_gpus=eligible_gpus, reason=None,
                        shortfall_micros=None)
    at = np.flatnonzero(mine.loser_bid_id == bid_id)
    assert len(at) == 1, "every bid of a tick either fills or loses with a reason"
    shortfall = int(mine.loser_shortfall[at[0]])
    return Clearing(filled=False, price_micros=None, eligible_gpus=eligible_gpus,
                    reason=Reason(int(mine.loser_reason[at[0]])).name.lower(),
                    shortfall_micros=shortfall if shortfall > 0 else None)
