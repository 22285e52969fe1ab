"""The publisher: after each committed auction tick (on the matching leader only), work out what
changed in every market, persist the new state and sequence numbers in `feed_state`, commit, then
publish small sequenced updates through the channels plugin to every server process.

Sequence numbers live in `feed_state` (one row per market and channel, updated in the transaction
that decides the update), so they survive a leader change: the next leader goes on from the stored
`seq` and diffs against the stored state. Should a leader die between that commit and the publish,
the hubs see the next message skip a number and reload from the database (a gap, healed)."""
from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from datetime import datetime, timedelta, timezone
from typing import Any, Awaitable, Callable

import asyncpg
import msgspec

from exchange.feed.schemas import MAX_PAYLOAD, Envelope, encoder
from exchange.markets import service as md
from exchange.markets.schemas import INTERVAL_SECONDS, Level, RiskIndex

log = logging.getLogger(__name__)
Publish = Callable[[bytes], Awaitable[None]]
RISK_REFRESH_S = 10.0
PREEMPTION_LOOKBACK = "10 minutes"


def _side_diff(old: md.Side, new: md.Side) -> dict[int, int]:
    return {p: new.get(p, 0) for p in old.keys() | new.keys() if old.get(p, 0) != new.get(p, 0)}


def _levels(changed: dict[int, int], descending: bool) -> list[Level]:
    return md.levels(changed, descending)


def split_data(data: dict[str, list], limit: int = MAX_PAYLOAD) -> list[dict[str, list]]:
    """Split an update of lists (book levels, trades) into parts that each encode under `limit` bytes;
    each part is a valid update on its own and their order keeps the original order."""
    if len(encoder.encode(data)) + 300 <= limit or sum(len(v) for v in data.values()) <= 1:
        return [data]
    first: dict[str, list] = {}
    second: dict[str, list] = {}
    for key, items in data.items():
        half = (len(items) + 1) // 2
        first[key], second[key] = items[:half], items[half:]
    return split_data(first, limit) + split_data(second, limit)


class FeedPublisher:
    def __init__(self, pool: asyncpg.Pool, publish: Publish) -> None:
        self.pool = pool
        self.publish = publish
        self._risk: dict[str, RiskIndex] = {}
        self._risk_at = 0.0

    async def on_tick(self, summary: Any) -> None:
        """The matching leader's tick listener."""
        await self.publish_tick(summary.at)

    async def publish_tick(self, now: datetime) -> int:
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                payloads = await self._collect(conn, now)
        for payload in payloads:
            await self.publish(payload)
        return len(payloads)

    async def _collect(self, conn: asyncpg.Connection, now: datetime) -> list[bytes]:
        markets = [r["id"] for r in await conn.fetch("SELECT id FROM markets ORDER BY id")]
        if not markets:
            return []
        stored: dict[tuple[str, str], tuple[int, Any]] = {
            (r["market"], r["channel"]): (r["seq"], json.loads(r["state"]))
            for r in await conn.fetch("SELECT market, channel, seq, state FROM feed_state FOR UPDATE")}

        # Cursors: the last trade id each market's trades and candles channels covered. A market seen
        # for the first time starts after the trades that happened before this tick (history, not news).
        fresh = [m for m in markets if (m, "trades") not in stored or (m, "candles") not in stored]
        start = {r["market"]: r["last"] for r in await conn.fetch(
            "SELECT market, max(id) AS last FROM trades WHERE at < $1 AND market = ANY($2::text[]) GROUP BY market",
            now, fresh)} if fresh else {}
        trade_cursor = {m: stored[(m, "trades")][1]["trade_id"] if (m, "trades") in stored else start.get(m, 0)
                        for m in markets}
        candle_cursor = {m: stored[(m, "candles")][1]["trade_id"] if (m, "candles") in stored else start.get(m, 0)
                         for m in markets}
        low = min(min(trade_cursor.values()), min(candle_cursor.values()))
        new_trades: dict[str, list[Any]] = defaultdict(list)
        for r in await conn.fetch("SELECT id, market, price, gpus, duration_s, at FROM trades WHERE id > $1"
                                  " AND market = ANY($2::text[]) ORDER BY id", low, markets):
            new_trades[r["market"]].append(r)
        window: dict[str, list[Any]] = defaultdict(list)
        for r in await conn.fetch(f"SELECT * FROM market_preemptions WHERE at >= now() - interval '{PREEMPTION_LOOKBACK}'"
                                  " AND market = ANY($1::text[]) ORDER BY id", markets):
            window[r["market"]].append(r)

        books = await md.compute_books(conn, now, markets)
        if time.monotonic() - self._risk_at > RISK_REFRESH_S or new_trades or window.keys() - self._risk.keys() \
                or any(m not in self._risk for m in markets):
            self._risk = await md.compute_risk(conn, now, markets)
            self._risk_at = time.monotonic()
        tickers = await md.compute_tickers(conn, now, markets, books, self._risk)

        updates: list[tuple[str, str, Any]] = []  # (market, channel, data), in publishing order
        new_state: dict[tuple[str, str], Any] = {}
        for m in markets:
            # book: changed levels only (0 GPUs: the level is gone)
            old = stored.get((m, "book"), (0, {"bids": [], "asks": []}))[1]
            bids, asks = books[m]
            state = {"bids": md.side_to_state(bids), "asks": md.side_to_state(asks)}
            if state != old:
                new_state[(m, "book")] = state
                db = _side_diff(md.side_from_state(old["bids"]), bids)
                da = _side_diff(md.side_from_state(old["asks"]), asks)
                for part in split_data({"bids": _levels(db, True), "asks": _levels(da, False)}):
                    updates.append((m, "book", part))
            # ticker: the whole ticker, when anything but its time changed
            if m in tickers:
                ticker = msgspec.to_builtins(tickers[m])
                old_ticker = stored.get((m, "ticker"), (0, None))[1]
                if old_ticker is None or _ticker_key(old_ticker) != _ticker_key(ticker):
                    new_state[(m, "ticker")] = ticker
                    updates.append((m, "ticker", ticker))
            # trades and preemptions since the cursor
            trades = [md.trade_from_row(r) for r in new_trades.get(m, []) if r["id"] > trade_cursor[m]]
            old_trades = stored.get((m, "trades"), (0, {"trade_id": trade_cursor[m], "seen": None}))[1]
            seen = set(old_trades["seen"]) if old_trades["seen"] is not None else {r["id"] for r in window.get(m, [])}
            preempted = [md.preemption_from_row(r) for r in window.get(m, []) if r["id"] not in seen]
            state = {"trade_id": trades[-1].id if trades else trade_cursor[m],
                     "seen": sorted(r["id"] for r in window.get(m, []))}
            if state != old_trades or (m, "trades") not in stored:
                new_state[(m, "trades")] = state
            if trades or preempted:
                for part in split_data({"trades": trades, "preemptions": preempted}):
                    updates.append((m, "trades", part))
            # candles: the current candle of each interval a new trade fell in
            fresh_trades = [r for r in new_trades.get(m, []) if r["id"] > candle_cursor[m]]
            if fresh_trades or (m, "candles") not in stored:
                last_id = fresh_trades[-1]["id"] if fresh_trades else candle_cursor[m]
                new_state[(m, "candles")] = {"trade_id": last_id}
                per_interval: dict[str, list] = {}
                for interval, step in INTERVAL_SECONDS.items():
                    buckets = sorted({md.bucket_start(r["at"], interval) for r in fresh_trades})
                    per_interval[interval] = []
                    for bucket in buckets:
                        per_interval[interval] += await md.compute_candles(
                            conn, m, interval, start=bucket, end=bucket + timedelta(seconds=step), limit=1,
                            max_trade_id=last_id)
                for k in range(max((len(v) for v in per_interval.values()), default=0)):
                    updates.append((m, "candles", {iv: c[k] for iv, c in per_interval.items() if k < len(c)}))

        # Sequence numbers: one per update, per market and channel, on from what is stored.
        seqs = {key: value[0] for key, value in stored.items()}
        ts = datetime.now(timezone.utc)
        payloads = []
        for market, channel, data in updates:
            seq = seqs.get((market, channel), 0) + 1
            seqs[(market, channel)] = seq
            if channel == "ticker":
                data = dict(data, seq=seq)
            payloads.append(encoder.encode(Envelope(channel=channel, type="update", market=market, seq=seq, ts=ts,
                                                    data=data)))
        rows = [(m, c, seqs.get((m, c), 0), json.dumps(state), now) for (m, c), state in new_state.items()]
        if rows:
            await conn.executemany(
                "INSERT INTO feed_state (market, channel, seq, state, updated_at) VALUES ($1, $2, $3, $4::jsonb, $5)"
                " ON CONFLICT (market, channel) DO UPDATE SET seq = EXCLUDED.seq, state = EXCLUDED.state,"
                " updated_at = EXCLUDED.updated_at", rows)
        return payloads


def _ticker_key(ticker: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in ticker.items() if k not in ("at", "seq")}


async def publish_envelopes(conn: asyncpg.Connection, publish: Publish, market: str, channel: str,
                            items: list[Any], state_of: Callable[[Any], Any]) -> list[int]:
    """Publish `items` as consecutive updates of one market and channel, storing each one's state
    (`state_of(item)`) and seq as the publisher does (used by `gpux bench feed` for its ticks)."""
    ts = datetime.now(timezone.utc)
    seqs = []
    async with conn.transaction():
        seq = await conn.fetchval("SELECT seq FROM feed_state WHERE market = $1 AND channel = $2 FOR UPDATE",
                                  market, channel) or 0
        payloads = []
        for item in items:
            seq += 1
            seqs.append(seq)
            payloads.append(encoder.encode(Envelope(channel=channel, type="update", market=market, seq=seq, ts=ts,
                                                    data=item)))
        await conn.execute(
            "INSERT INTO feed_state (market, channel, seq, state, updated_at) VALUES ($1, $2, $3, $4::jsonb, $5)"
            " ON CONFLICT (market, channel) DO UPDATE SET seq = EXCLUDED.seq, state = EXCLUDED.state,"
            " updated_at = EXCLUDED.updated_at", market, channel, seq, json.dumps(state_of(items[-1])), ts)
    for payload in payloads:
        await publish(payload)
    return seqs
