"""The hub: one per server process. It listens to the feed's channel (Litestar's channels plugin),
keeps the state of every market someone here watches (so that a new subscriber gets a snapshot from
memory, consistent with the sequence number that follows), and fans each update out to this
process's websocket subscribers: the message is forwarded as the publisher encoded it, the same
bytes to every subscriber.

Each subscriber has a bounded backlog (GPUX_FEED_MAX_BACKLOG messages queued, unsent); one that
falls that far behind is disconnected with a reason (close code 1008, an error envelope first when
its socket still takes it), so a stalled reader can never make the server's memory grow."""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

import asyncpg
import msgspec
from litestar.channels import ChannelsPlugin

from exchange.feed.config import FeedSettings
from exchange.feed.limits import SubscribeGuard
from exchange.core.money import parse_money
from exchange.feed.schemas import CHANNELS, FEED_CHANNEL, Envelope, FeedOp, encoder, envelope_decoder, op_decoder
from exchange.markets import service as md
from exchange.markets.schemas import INTERVAL_SECONDS

log = logging.getLogger(__name__)
SNAPSHOT_TRADES = 100
SNAPSHOT_PREEMPTIONS = 50
SNAPSHOT_CANDLES = 100
SLOW_CONSUMER = 1008  # policy violation: the client did not read fast enough

Event = dict[str, Any]  # an ASGI websocket.send event, shared by every subscriber it goes to


def text_frame(payload: bytes) -> bytes:
    """One unmasked, final websocket text frame (RFC 6455 §5.2) around `payload`. Uncompressed frames
    are valid also where permessage-deflate was negotiated (RFC 7692 §6: RSV1 unset)."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


def _event(payload: bytes, fan_out: bool = False) -> Event:
    # A fan-out update (the same bytes to every subscriber) carries its whole websocket frame,
    # built once and written as is into every subscriber's socket (Subscriber.push); messages for
    # one subscriber (snapshots, errors, heartbeats) go through the websocket layer.
    event: Event = {"type": "websocket.send", "bytes": None, "text": payload.decode("utf-8")}
    if fan_out:
        event["frame"] = text_frame(payload)
    return event


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Subscriber:
    """One websocket connection: what it subscribed to and its queue of unsent messages.

    Sending is eager: a message to a subscriber with nothing queued is sent at once, inside the
    fan-out loop (the ASGI send of a writable socket completes without suspending), and only a send
    that has to wait (the socket's buffer is full) moves to a task, behind which later messages
    queue. A thousand subscribers then cost a thousand socket writes per update, not a thousand task
    switches on top."""
    __slots__ = ("hub", "send", "queue", "done", "kill_reason", "subs", "last_push", "task", "sent", "transport")

    def __init__(self, hub: "FeedHub", send: Callable[[Event], Awaitable[None]]) -> None:
        self.hub = hub
        self.send = send
        # The socket's own write buffer, where the server can see it (uvicorn's protocol under the ASGI
        # send): the server may keep sending into it without ever waiting, so it is bounded too.
        self.transport = _transport_of(send)
        self.queue: deque[Event] = deque()
        self.done = asyncio.Event()
        self.kill_reason: str | None = None
        self.subs: set[tuple[str, str]] = set()
        self.last_push = asyncio.get_running_loop().time()
        self.task: asyncio.Task | None = None
        self.sent = 0

    def push(self, event: Event) -> None:
        if self.done.is_set():
            return
        self.last_push = self.hub.loop.time()
        if self.task is not None:  # a send is waiting for the socket: queue behind it
            if len(self.queue) >= self.hub.settings.max_backlog:
                self.kill(f"slow consumer: more than {self.hub.settings.max_backlog} messages waiting to be sent")
                return
            self.queue.append(event)
            return
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size() > self.hub.settings.max_buffer_bytes:
            self.kill(f"slow consumer: more than {self.hub.settings.max_buffer_bytes} bytes waiting to be sent")
            return
        frame = event.get("frame")
        if frame is not None and transport is not None:
            if transport.is_closing():
                self.finish()
                return
            # The fan-out's hot path: the same prebuilt frame for every subscriber, one write each,
            # instead of a pass through the ASGI and websocket layers per subscriber. Its buffer is
            # bounded just above; nothing is queued for this subscriber (checked above), so order holds.
            transport.write(frame)
            self.sent += 1
            return
        coro = self.send(event)
        try:
            waiting_on = coro.send(None)
        except StopIteration:
            self.sent += 1
            return
        except Exception:  # the socket went away
            self.finish()
            return
        self.task = asyncio.create_task(self._drain(coro, waiting_on))

    async def _drain(self, coro, waiting_on) -> None:
        """Finish the send that had to wait, then send what queued behind it, then go back to eager."""
        fresh = object()
        try:
            while True:
                if waiting_on is None:
                    await asyncio.sleep(0)  # a bare yield: give the loop one turn
                elif waiting_on is not fresh:
                    try:
                        await waiting_on
                    except Exception:
                        pass  # the send coroutine sees the outcome itself when resumed
                try:
                    waiting_on = coro.send(None)
                    continue
                except StopIteration:
                    self.sent += 1
                if not self.queue:
                    break
                coro = self.send(self.queue.popleft())
                waiting_on = fresh
        except asyncio.CancelledError:
            coro.close()
            raise
        except Exception:  # the socket went away mid-send
            self.finish()
        finally:
            self.task = None

    def kill(self, reason: str) -> None:
        if not self.done.is_set():
            self.kill_reason = reason
            self.queue.clear()
            self.hub.slow_disconnects += 1
            log.warning("feed subscriber disconnected: %s", reason)
            self.finish()

    def finish(self) -> None:
        self.done.set()


def _transport_of(send: Any, depth: int = 0) -> Any:
    """Find the asyncio transport under an ASGI send callable (through middleware wrappers and
    closures), or None."""
    if depth > 8 or send is None:
        return None
    owner = getattr(send, "__self__", None)
    transport = getattr(owner, "transport", None)
    if transport is not None and hasattr(transport, "get_write_buffer_size"):
        return transport
    for inner in [getattr(send, "__wrapped__", None), getattr(owner, "_send", None), getattr(owner, "send", None)] + \
            [cell.cell_contents for cell in (getattr(send, "__closure__", None) or ())
             if callable(getattr(cell, "cell_contents", None))]:
        if inner is not None and inner is not send:
            found = _transport_of(inner, depth + 1)
            if found is not None:
                return found
    return None


class MarketState:
    """What a subscriber's snapshot is made of, for one market, at `seq[channel]`."""

    def __init__(self) -> None:
        self.seq: dict[str, int] = {c: 0 for c in CHANNELS}
        self.bids: md.Side = {}
        self.asks: md.Side = {}
        self.ticker: dict[str, Any] | None = None
        self.trades: deque[dict[str, Any]] = deque(maxlen=SNAPSHOT_TRADES)
        self.preemptions: deque[dict[str, Any]] = deque(maxlen=SNAPSHOT_PREEMPTIONS)
        self.candles: dict[str, dict[str, dict[str, Any]]] = {iv: {} for iv in INTERVAL_SECONDS}
        self.snapshots: dict[str, tuple[int, Event]] = {}

    def apply(self, channel: str, data: Any) -> None:
        if channel == "book":
            for side, book in (("bids", self.bids), ("asks", self.asks)):
                for level in data.get(side, ()):
                    price = parse_money(level["price"])
                    if level["gpus"] > 0:
                        book[price] = level["gpus"]
                    else:
                        book.pop(price, None)
        elif channel == "ticker":
            self.ticker = data
        elif channel == "trades":
            known = {t["id"] for t in self.trades}
            self.trades.extend(t for t in data.get("trades", ()) if t["id"] not in known)
            known = {p["id"] for p in self.preemptions}
            self.preemptions.extend(p for p in data.get("preemptions", ()) if p["id"] not in known)
        elif channel == "candles":
            for interval, candle in data.items():
                series = self.candles.get(interval)
                if series is None:
                    continue
                series[candle["t"]] = candle
                if len(series) > SNAPSHOT_CANDLES:
                    del series[min(series)]

    def snapshot_data(self, channel: str) -> Any:
        if channel == "book":
            return {"bids": md.levels(self.bids, True), "asks": md.levels(self.asks, False)}
        if channel == "ticker":
            return self.ticker
        if channel == "trades":
            return {"trades": list(self.trades), "preemptions": list(self.preemptions)}
        return {iv: [series[t] for t in sorted(series)] for iv, series in self.candles.items()}


async def load_market(pool: asyncpg.Pool, market: str) -> MarketState | None:
    """A market's feed state from the database, exactly as of each channel's stored `seq`."""
    import json

    if not await pool.fetchval("SELECT 1 FROM markets WHERE id = $1", market):
        return None
    state = MarketState()
    rows = {r["channel"]: r for r in await pool.fetch(
        "SELECT channel, seq, state FROM feed_state WHERE market = $1", market)}
    stored = {c: json.loads(r["state"]) for c, r in rows.items()}
    for channel, row in rows.items():
        state.seq[channel] = row["seq"]
    if "book" in stored:
        state.bids = md.side_from_state(stored["book"]["bids"])
        state.asks = md.side_from_state(stored["book"]["asks"])
    state.ticker = stored.get("ticker")
    if "trades" in stored:
        cursor = stored["trades"]["trade_id"]
        state.trades.extend(msgspec.to_builtins(await md.recent_trades(pool, market, SNAPSHOT_TRADES, cursor)))
        seen = stored["trades"].get("seen") or []
        rows_p = await pool.fetch("SELECT * FROM market_preemptions WHERE market = $1 AND id <= $2"
                                  " ORDER BY id DESC LIMIT $3", market, max(seen, default=0), SNAPSHOT_PREEMPTIONS)
        state.preemptions.extend(msgspec.to_builtins([md.preemption_from_row(r) for r in reversed(rows_p)]))
    if "candles" in stored:
        cursor = stored["candles"]["trade_id"]
        for interval in INTERVAL_SECONDS:
            candles = await md.compute_candles(pool, market, interval, limit=SNAPSHOT_CANDLES, max_trade_id=cursor)
            state.candles[interval] = {c["t"]: c for c in msgspec.to_builtins(candles)}
    return state


class FeedHub:
    def __init__(self, pool: asyncpg.Pool, channels: ChannelsPlugin, settings: FeedSettings) -> None:
        self.pool = pool
        self.channels = channels
        self.settings = settings
        self.loop = asyncio.get_running_loop()
        self.markets: dict[str, MarketState] = {}
        self.loading: dict[str, asyncio.Future] = {}
        self.buffered: dict[str, list[tuple[Envelope, bytes]]] = {}
        self.subs: dict[tuple[str, str], set[Subscriber]] = {}
        self.clients: set[Subscriber] = set()
        self.received = 0
        self.gaps = 0
        self.slow_disconnects = 0
        self.resyncs = 0
        self._tasks: list[asyncio.Task] = []
        self._upstream = None
        self._warned_transport = False

    # --- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._upstream = await self.channels.subscribe(FEED_CHANNEL)
        self._tasks = [asyncio.create_task(self._consume(), name="feed-upstream"),
                       asyncio.create_task(self._heartbeats(), name="feed-heartbeats")]

    async def stop(self) -> None:
        for client in list(self.clients):
            client.finish()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._upstream is not None:
            await self.channels.unsubscribe(self._upstream)

    def connect(self, send: Callable[[Event], Awaitable[None]]) -> Subscriber:
        client = Subscriber(self, send)
        if client.transport is None and not self._warned_transport:
            self._warned_transport = True
            log.warning("feed: the socket's write buffer is not visible here; only queued messages are bounded")
        self.clients.add(client)
        return client

    async def disconnect(self, client: Subscriber) -> None:
        client.finish()
        self.clients.discard(client)
        for key in client.subs:
            subscribers = self.subs.get(key)
            if subscribers is not None:
                subscribers.discard(client)
                if not subscribers:
                    del self.subs[key]
        client.subs.clear()
        task = client.task
        if task is not None:
            task.cancel()
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass

    # --- upstream: updates from the publisher, through the channels plugin ------------------------
    async def _consume(self) -> None:
        async for payload in self._upstream.iter_events():
            try:
                self.on_message(payload)
            except Exception:
                log.exception("bad feed message dropped")

    def on_message(self, payload: bytes) -> None:
        self.received += 1
        envelope = envelope_decoder.decode(payload)
        market = envelope.market
        if market in self.loading:
            self.buffered[market].append((envelope, payload))
            return
        state = self.markets.get(market)
        if state is None:  # nobody in this process watches it
            return
        self._apply(market, state, envelope, payload)

    def _apply(self, market: str, state: MarketState, envelope: Envelope, payload: bytes) -> None:
        channel = envelope.channel
        current = state.seq.get(channel, 0)
        if envelope.seq <= current:
            return  # already in the state (loaded from the database after it was published)
        if envelope.seq > current + 1:
            # A message never reached us (a publisher died between commit and publish, or the
            # listener lagged): reload from the database and send everyone here a fresh snapshot.
            self.gaps += 1
            log.warning("feed gap on %s/%s: have %d, got %d; reloading", market, channel, current, envelope.seq)
            self.markets.pop(market, None)
            pending = self.loading[market] = self.loop.create_future()
            self.buffered[market] = [(envelope, payload)]
            asyncio.create_task(self._reload(market, pending))
            return
        state.apply(channel, envelope.data)
        state.seq[channel] = envelope.seq
        subscribers = self.subs.get((market, channel))
        if subscribers:
            event = _event(payload, fan_out=True)
            for client in tuple(subscribers):
                client.push(event)

    async def ensure_market(self, market: str) -> MarketState | None:
        state = self.markets.get(market)
        if state is not None:
            return state
        pending = self.loading.get(market)
        if pending is None:
            pending = self.loading[market] = self.loop.create_future()
            self.buffered.setdefault(market, [])
            asyncio.create_task(self._load(market, pending))
        return await asyncio.shield(pending)

    async def _load(self, market: str, done: asyncio.Future,
                    on_loaded: Callable[[MarketState], None] | None = None) -> None:
        try:
            state = await load_market(self.pool, market)
        except Exception:
            log.exception("could not load feed state of %s", market)
            self.loading.pop(market, None)
            self.buffered.pop(market, None)
            done.set_result(None)
            return
        self.loading.pop(market, None)
        buffered = self.buffered.pop(market, [])
        if state is not None:
            self.markets[market] = state
            if on_loaded is not None:  # e.g. fresh snapshots: before the updates that go on from them
                on_loaded(state)
            for envelope, payload in buffered:
                self._apply(market, state, envelope, payload)
        done.set_result(state)

    async def _reload(self, market: str, pending: asyncio.Future) -> None:
        """Load the market again and send its subscribers here a fresh snapshot per channel, ahead of
        the updates that arrived during the load (so what each subscriber gets after the snapshot goes
        on from its seq one by one)."""
        def send_snapshots(state: MarketState) -> None:
            for channel in CHANNELS:
                subscribers = self.subs.get((market, channel))
                if subscribers:
                    event = self.snapshot(market, state, channel)
                    for client in tuple(subscribers):
                        client.push(event)

        await self._load(market, pending, send_snapshots)

    async def resync(self) -> None:
        """The LISTEN connection came back after a loss (exchange/core/listener.py): the updates
        published meanwhile never arrive here, and what is in memory may be stale. Every market
        someone here watches is reloaded from the database (state and seqs as the publisher stored
        them) and its subscribers get fresh snapshots; the others are dropped (loaded again when
        someone subscribes). A market whose load fails is retried with backoff while watched."""
        self.resyncs += 1
        watched = {market for market, _ in self.subs}
        for market in [m for m in self.markets if m not in watched]:
            del self.markets[market]
        await asyncio.gather(*(self._resync_market(market) for market in watched))

    async def _resync_market(self, market: str) -> None:
        delay = 0.1
        while any((market, channel) in self.subs for channel in CHANNELS):
            pending = self.loading.get(market)
            if pending is not None:  # a load that may have read the database while we were deaf
                await asyncio.shield(pending)
                continue
            self.markets.pop(market, None)
            pending = self.loading[market] = self.loop.create_future()
            self.buffered[market] = []
            await self._reload(market, pending)
            if market in self.markets:
                return
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    # --- subscribers ------------------------------------------------------------------------------
    def snapshot(self, market: str, state: MarketState, channel: str) -> Event:
        seq = state.seq.get(channel, 0)
        cached = state.snapshots.get(channel)
        if cached is not None and cached[0] == seq:
            return cached[1]
        event = _event(encoder.encode(Envelope(channel=channel, type="snapshot", market=market, seq=seq, ts=_now(),
                                               data=state.snapshot_data(channel))))
        state.snapshots[channel] = (seq, event)
        return event

    @staticmethod
    def error_event(code: str, message: str, market: str | None = None, channel: str = "feed") -> Event:
        return _event(encoder.encode(Envelope(channel=channel, type="error", market=market, seq=None, ts=_now(),
                                              data={"code": code, "message": message})))

    def error(self, client: Subscriber, code: str, message: str, market: str | None = None,
              channel: str = "feed") -> None:
        client.push(self.error_event(code, message, market, channel))

    def heartbeat(self, client: Subscriber) -> None:
        seqs: dict[str, dict[str, int]] = {}
        for market, channel in client.subs:
            state = self.markets.get(market)
            if state is not None:
                seqs.setdefault(market, {})[channel] = state.seq.get(channel, 0)
        client.push(_event(encoder.encode(Envelope(channel="heartbeat", type="heartbeat", market=None, seq=None,
                                                   ts=_now(), data={"seqs": seqs}))))

    # What a message may cost (exchange/feed/limits.py); set by the plugin, None: no bound.
    guard: SubscribeGuard | None = None

    async def handle(self, client: Subscriber, raw: str | bytes) -> None:
        try:
            op: FeedOp = op_decoder.decode(raw)
        except msgspec.DecodeError as exc:
            self.error(client, "bad_request", f"not a feed op: {exc}")
            return
        if op.op == "ping":
            self.heartbeat(client)
            return
        unknown = [c for c in op.channels if c not in CHANNELS]
        if unknown or not op.channels or not op.markets:
            self.error(client, "bad_request", f"channels must be some of {', '.join(CHANNELS)} and markets non-empty"
                       + (f"; unknown: {', '.join(unknown)}" if unknown else ""))
            return
        guard = self.guard
        if guard is not None and len(op.markets) > guard.max_markets:
            # Refused whole, before any work: no lookup, no snapshot, no subscription.
            self.error(client, "too_many_markets",
                       f"a message may name at most {guard.max_markets} markets; this one names {len(op.markets)}")
            return
        # A market or channel named twice is one subscription (and one snapshot).
        markets = list(dict.fromkeys(op.markets))
        channels = list(dict.fromkeys(op.channels))
        if op.op == "unsubscribe":
            for market in markets:
                for channel in channels:
                    key = (market, channel)
                    client.subs.discard(key)
                    subscribers = self.subs.get(key)
                    if subscribers is not None:
                        subscribers.discard(client)
                        if not subscribers:
                            del self.subs[key]
            return
        missing = set(await guard.known.unknown(markets)) if guard is not None else set()
        for market in markets:
            if all((market, channel) in client.subs for channel in channels):
                continue  # already subscribed: a no-op, no second snapshot
            state = None if market in missing else await self.ensure_market(market)
            if state is None:
                self.error(client, "unknown_market", f"market {market} not found (or its data is not available now)", market=market)
                continue
            for channel in channels:
                key = (market, channel)
                if key in client.subs:
                    continue
                if len(client.subs) >= self.settings.max_subscriptions:
                    self.error(client, "too_many_subscriptions",
                               f"at most {self.settings.max_subscriptions} market-channel subscriptions per connection",
                               market=market, channel=channel)
                    continue
                # A snapshot at the current seq, then (same loop turn: nothing in between) every update.
                client.push(self.snapshot(market, state, channel))
                client.subs.add(key)
                self.subs.setdefault(key, set()).add(client)

    async def _heartbeats(self) -> None:
        interval = self.settings.heartbeat_s
        while True:
            await asyncio.sleep(min(1.0, interval / 2))
            now = self.loop.time()
            for client in tuple(self.clients):
                if now - client.last_push >= interval:
                    self.heartbeat(client)

    def stats(self) -> dict[str, int]:
        return {"subscribers": len(self.clients), "markets": len(self.markets), "received": self.received,
                "gaps": self.gaps, "slow_disconnects": self.slow_disconnects, "resyncs": self.resyncs}
