"""Markets and their data: the L2 book, ticker, trades, candles and the reclaim-risk index. The
queries take a connection (or the pool) so that the REST handlers and the feed's publisher share
them; the publisher runs them for every market at once after each auction tick."""
from __future__ import annotations

import json
import math
from datetime import datetime, timedelta, timezone
from typing import Any

import asyncpg

from exchange.auction.book_sync import free_gpus, live_offers
from exchange.core.bounds import check_time
from exchange.core.context import AppContext
from exchange.core.errors import InvalidField, NotFound
from exchange.core.money import format_money
from exchange.leases.lifecycle import PREEMPTION_REASONS
from exchange.markets.schemas import (INTERVAL_SECONDS, TIERS, Book, Candle, CandleList, Level, Market, Preemption,
                                      RiskIndex, Ticker, Trade, TradeList)

Db = asyncpg.Connection | asyncpg.Pool
# A book side as the feed keeps it: price (micro-dollars per GPU-hour) -> GPUs.
Side = dict[int, int]
RISK_WINDOW_H = 24
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def market_id(model: str, tier: str) -> str:
    return f"{model}/{tier}"


async def ensure_markets(conn: asyncpg.Connection, models: set[str], now: datetime) -> None:
    """A market exists for each GPU model any host has reported, in both tiers."""
    rows = [(market_id(m, t), m, t, now) for m in sorted(models) for t in TIERS]
    await conn.executemany(
        "INSERT INTO markets (id, model, tier, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING", rows)


def _money(value: int | None) -> str | None:
    return None if value is None else format_money(value)


async def list_markets(ctx: AppContext) -> list[Market]:
    rows = await ctx.pool.fetch("SELECT * FROM markets ORDER BY model, tier")
    return [Market(id=r["id"], model=r["model"], tier=r["tier"], last_price=_money(r["last_price"]),
                   indicative_price=_money(r["indicative_price"]), last_trade_at=r["last_trade_at"]) for r in rows]


async def require_market(db: Db, model: str, tier: str) -> str:
    market = market_id(model, tier)
    if tier not in TIERS or not await db.fetchval("SELECT 1 FROM markets WHERE id = $1", market):
        raise NotFound(f"market {market}")
    return market


# --- the L2 book ------------------------------------------------------------------------------------

async def compute_books(db: Db, now: datetime, markets: list[str]) -> dict[str, tuple[Side, Side]]:
    """Each market's book now: bids are the open bids by limit price; asks are the free GPUs of live
    offers available now (exchange/auction/book_sync.py: what the matching book sells), by floor
    price (a firm market's asks: only offers whose firm window is still open)."""
    books: dict[str, tuple[Side, Side]] = {m: ({}, {}) for m in markets}
    for r in await db.fetch(
            "SELECT market, limit_price, sum(gpus)::bigint AS gpus FROM bids WHERE status = 'open'"
            " AND market = ANY($1::text[]) GROUP BY market, limit_price", markets):
        books[r["market"]][0][r["limit_price"]] = r["gpus"]
    models = sorted({m.rsplit("/", 1)[0] for m in markets})
    for r in await live_offers(db, now, models):
        # Free as the matching book counts it: the host's GPUs less what live leases (sold by any
        # offer, a republished one's included) and the owner's reclaims hold; none on a silent host.
        gpus = free_gpus(r["gpus"], r["host_gpus"], r["leased"], r["reclaimed"], r["health"])
        if gpus <= 0:
            continue
        firm = r["firm_until"] is not None and r["firm_until"] > now
        for tier in ("spot", "firm") if firm else ("spot",):
            book = books.get(market_id(r["model"], tier))
            if book is not None:
                book[1][r["floor_price"]] = book[1].get(r["floor_price"], 0) + gpus
    return books


def levels(side: Side, descending: bool) -> list[Level]:
    return [Level(price=format_money(p), gpus=g) for p, g in sorted(side.items(), reverse=descending)]


def side_from_state(pairs: list[list[int]]) -> Side:
    return {int(p): int(g) for p, g in pairs}


def side_to_state(side: Side) -> list[list[int]]:
    return [[p, g] for p, g in sorted(side.items())]


async def get_book(ctx: AppContext, model: str, tier: str) -> Book:
    """The book as last published on the feed (the state at its `seq`), so that a client that saw a
    gap can resync from here and go on with the updates after `seq`."""
    market = await require_market(ctx.pool, model, tier)
    row = await ctx.pool.fetchrow("SELECT seq, state, updated_at FROM feed_state WHERE market = $1 AND channel = 'book'",
                                  market)
    if row is None:  # nothing published yet (no tick since start): the live book, before seq 1
        bids, asks = (await compute_books(ctx.pool, ctx.clock(), [market]))[market]
        return Book(market=market, seq=0, at=None, bids=levels(bids, True), asks=levels(asks, False))
    state = json.loads(row["state"])
    return Book(market=market, seq=row["seq"], at=row["updated_at"], bids=levels(side_from_state(state["bids"]), True),
                asks=levels(side_from_state(state["asks"]), False))


# --- trades and preemptions ------------------------------------------------------------------------

def trade_from_row(r: Any) -> Trade:
    return Trade(id=r["id"], price=format_money(r["price"]), gpus=r["gpus"], duration_s=r["duration_s"],
                 gpu_hours=round(r["gpus"] * r["duration_s"] / 3600, 6), at=r["at"])


def preemption_from_row(r: Any) -> Preemption:
    return Preemption(id=r["id"], lease_id=r["lease_id"], gpus=r["gpus"], reason=r["reason"], at=r["at"],
                      ends_at=r["ends_at"])


async def recent_trades(db: Db, market: str, limit: int, max_id: int | None = None) -> list[Trade]:
    """The last `limit` trades (up to trade id `max_id`), oldest first."""
    rows = await db.fetch(
        "SELECT id, price, gpus, duration_s, at FROM trades WHERE market = $1 AND ($2::bigint IS NULL OR id <= $2)"
        " ORDER BY id DESC LIMIT $3", market, max_id, limit)
    return [trade_from_row(r) for r in reversed(rows)]


async def recent_preemptions(db: Db, market: str, limit: int) -> list[Preemption]:
    rows = await db.fetch("SELECT * FROM market_preemptions WHERE market = $1 ORDER BY id DESC LIMIT $2", market, limit)
    return [preemption_from_row(r) for r in reversed(rows)]


async def get_trades(ctx: AppContext, model: str, tier: str, limit: int) -> TradeList:
    market = await require_market(ctx.pool, model, tier)
    return TradeList(market=market, items=await recent_trades(ctx.pool, market, limit),
                     preemptions=await recent_preemptions(ctx.pool, market, min(limit, 100)))


# --- candles ---------------------------------------------------------------------------------------

def bucket_start(at: datetime, interval: str) -> datetime:
    step = INTERVAL_SECONDS[interval]
    seconds = int((at - EPOCH).total_seconds()) // step * step
    return EPOCH + timedelta(seconds=seconds)


async def compute_candles(db: Db, market: str, interval: str, *, start: datetime | None = None,
                          end: datetime | None = None, limit: int = 500, max_trade_id: int | None = None) -> list[Candle]:
    """OHLCV from the trades: one candle per interval that had trades, the newest `limit`, oldest first."""
    step = INTERVAL_SECONDS[interval]
    rows = await db.fetch(
        "SELECT date_bin(make_interval(secs => $2), at, 'epoch'::timestamptz) AS t,"
        " (array_agg(price ORDER BY id))[1] AS open, max(price) AS high, min(price) AS low,"
        " (array_agg(price ORDER BY id DESC))[1] AS close, sum(gpus::bigint * duration_s) AS gpu_s, count(*) AS n"
        " FROM trades WHERE market = $1 AND ($3::timestamptz IS NULL OR at >= $3) AND ($4::timestamptz IS NULL OR at < $4)"
        " AND ($5::bigint IS NULL OR id <= $5) GROUP BY 1 ORDER BY 1 DESC LIMIT $6",
        market, float(step), start, end, max_trade_id, limit)
    return [candle_from_row(r) for r in reversed(rows)]


def candle_from_row(r: Any) -> Candle:
    return Candle(t=r["t"], open=format_money(r["open"]), high=format_money(r["high"]), low=format_money(r["low"]),
                  close=format_money(r["close"]), volume_gpu_h=round(float(r["gpu_s"]) / 3600, 6), trades=r["n"])


async def get_candles(ctx: AppContext, model: str, tier: str, interval: str, start: datetime | None,
                      end: datetime | None, limit: int) -> CandleList:
    market = await require_market(ctx.pool, model, tier)
    if interval not in INTERVAL_SECONDS:
        raise InvalidField("interval", f"one of {', '.join(INTERVAL_SECONDS)}")
    check_time("start", start)
    check_time("end", end)
    items = await compute_candles(ctx.pool, market, interval, start=start, end=end, limit=limit)
    return CandleList(market=market, interval=interval, items=items)


# --- the ticker and the reclaim-risk index ---------------------------------------------------------

async def compute_risk(db: Db, now: datetime, markets: list[str]) -> dict[str, RiskIndex]:
    """Per market over the last 24 h: the share of the spot GPU-hours bought (leases started in the
    window) that preemption took back; the hazard: preemptions per lease-hour of spot exposure in the
    window; and the owners' forecast hazard (their offers' reclaim_rate_per_h, GPU-weighted)."""
    since = now - timedelta(hours=RISK_WINDOW_H)
    bought = {r["market"]: r for r in await db.fetch(
        "SELECT market, sum(gpus * extract(epoch FROM planned_end_at - start_at))::float8 AS gpu_s,"
        " sum(CASE WHEN end_reason = ANY($3::text[]) THEN gpus * greatest(0, extract(epoch FROM"
        "   planned_end_at - coalesce(end_at, planned_end_at))) ELSE 0 END)::float8 AS lost_s"
        " FROM leases WHERE tier = 'spot' AND start_at >= $1 AND market = ANY($2::text[]) GROUP BY market",
        since, markets, [str(r) for r in PREEMPTION_REASONS])}
    exposure = {r["market"]: r["lease_s"] for r in await db.fetch(
        "SELECT market, sum(extract(epoch FROM least(coalesce(CASE WHEN status IN ('ended', 'failed') THEN end_at END,"
        "   $2), $2) - greatest(start_at, $1)))::float8 AS lease_s"
        " FROM leases WHERE tier = 'spot' AND market = ANY($3::text[]) AND start_at < $2"
        " AND (status IN ('active', 'ending') OR end_at > $1) GROUP BY market", since, now, markets)}
    events = {r["market"]: r["n"] for r in await db.fetch(
        "SELECT market, count(*) AS n FROM market_preemptions WHERE at >= $1 AND market = ANY($2::text[])"
        " GROUP BY market", since, markets)}
    models = sorted({m.rsplit("/", 1)[0] for m in markets})
    forecast = {r["model"]: r["rate"] for r in await db.fetch(
        "SELECT model, (sum(gpus * reclaim_rate_per_h) / sum(gpus))::float8 AS rate FROM offers"
        " WHERE status = 'live' AND available_until > $1 AND model = ANY($2::text[]) GROUP BY model", now, models)}
    out: dict[str, RiskIndex] = {}
    for market in markets:
        model, tier = market.rsplit("/", 1)
        b = bought.get(market)
        gpu_s = b["gpu_s"] if b else 0.0
        share = (b["lost_s"] / gpu_s) if b and gpu_s > 0 else 0.0
        n = events.get(market, 0)
        lease_h = max(exposure.get(market) or 0.0, 0.0) / 3600
        hazard = n / lease_h if lease_h > 0 else 0.0
        out[market] = RiskIndex(
            market=market, window_h=RISK_WINDOW_H, preempted_share=round(share, 6), hazard_per_h=round(hazard, 6),
            survival_1h=round(math.exp(-hazard), 6), preemptions=n, spot_gpu_hours=round(gpu_s / 3600, 6),
            forecast_hazard_per_h=round(forecast.get(model) or 0.0, 6) if tier == "spot" else 0.0)
    return out


async def compute_tickers(db: Db, now: datetime, markets: list[str], books: dict[str, tuple[Side, Side]],
                          risk: dict[str, RiskIndex]) -> dict[str, Ticker]:
    since = now - timedelta(hours=RISK_WINDOW_H)
    info = {r["id"]: r for r in await db.fetch(
        "SELECT id, last_price, indicative_price, last_trade_at FROM markets WHERE id = ANY($1::text[])", markets)}
    day = {r["market"]: r for r in await db.fetch(
        "SELECT market, count(*) AS n, sum(gpus::bigint * duration_s) AS gpu_s, max(price) AS high, min(price) AS low,"
        " (array_agg(price ORDER BY id))[1] AS first FROM trades WHERE at > $1 AND market = ANY($2::text[])"
        " GROUP BY market", since, markets)}
    # The reference for the 24 h change: the last price traded at or before 24 h ago, else the first since.
    before = {r["market"]: r["price"] for r in await db.fetch(
        "SELECT DISTINCT ON (market) market, price FROM trades WHERE at <= $1 AND market = ANY($2::text[])"
        " ORDER BY market, id DESC", since, markets)}
    open_bids = {r["market"]: r["n"] for r in await db.fetch(
        "SELECT market, count(*) AS n FROM bids WHERE status = 'open' AND market = ANY($1::text[]) GROUP BY market",
        markets)}
    leased = await compute_leased(db, markets)
    out: dict[str, Ticker] = {}
    for market in markets:
        row = info.get(market)
        if row is None:
            continue
        bids, asks = books.get(market, ({}, {}))
        d = day.get(market)
        last = row["last_price"]
        ref = before.get(market, d["first"] if d else None)
        change = last - ref if last is not None and ref is not None else None
        out[market] = Ticker(
            market=market, last=_money(last), indicative=_money(row["indicative_price"]),
            best_bid=_money(max(bids) if bids else None), best_ask=_money(min(asks) if asks else None),
            volume_24h_gpu_h=round(float(d["gpu_s"] if d else 0) / 3600, 6), trades_24h=d["n"] if d else 0,
            high_24h=_money(d["high"] if d else None), low_24h=_money(d["low"] if d else None),
            change_24h=_money(change), change_24h_pct=round(100 * change / ref, 4) if change is not None and ref else None,
            open_bids=open_bids.get(market, 0), last_trade_at=row["last_trade_at"], risk=risk[market],
            gpus_offered=leased.get(market, 0) + sum(asks.values()), gpus_leased=leased.get(market, 0), at=now)
    return out


async def compute_leased(db: Db, markets: list[str]) -> dict[str, int]:
    """Per market: the GPUs its live (active or ending) leases hold now."""
    return {r["market"]: r["gpus"] for r in await db.fetch(
        "SELECT market, sum(gpus)::bigint AS gpus FROM leases WHERE status IN ('active', 'ending')"
        " AND market = ANY($1::text[]) GROUP BY market", markets)}


async def get_ticker(ctx: AppContext, model: str, tier: str) -> Ticker:
    market = await require_market(ctx.pool, model, tier)
    now = ctx.clock()
    books = await compute_books(ctx.pool, now, [market])
    risk = await compute_risk(ctx.pool, now, [market])
    ticker = (await compute_tickers(ctx.pool, now, [market], books, risk))[market]
    seq = await ctx.pool.fetchval("SELECT seq FROM feed_state WHERE market = $1 AND channel = 'ticker'", market)
    return _replace(ticker, seq=seq or 0)


async def get_risk(ctx: AppContext, model: str, tier: str) -> RiskIndex:
    market = await require_market(ctx.pool, model, tier)
    return (await compute_risk(ctx.pool, ctx.clock(), [market]))[market]


def _replace(struct: Any, **changes: Any) -> Any:
    import msgspec

    return msgspec.structs.replace(struct, **changes)
