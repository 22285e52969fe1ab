"""A feed client that keeps a local copy of markets from `/v1/feed`: snapshot, then updates in
sequence; on a gap (an update whose `seq` is not the next one) it resyncs, the book from the REST
snapshot (`GET /v1/markets/{model}/{tier}/book`, which carries its seq), other channels by
subscribing again. Used by `gpux watch` and by the tests."""
from __future__ import annotations

import json
from collections import deque
from typing import Any, Callable

import httpx
import websockets
from websockets.asyncio.client import ClientConnection

from exchange.core.money import parse_money
from exchange.feed.schemas import CHANNELS, Envelope, envelope_decoder


def ws_url(base_url: str) -> str:
    return base_url.replace("https://", "wss://", 1).replace("http://", "ws://", 1).rstrip("/") + "/v1/feed"


class MarketView:
    def __init__(self) -> None:
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        self.ticker: dict[str, Any] | None = None
        self.trades: deque[dict[str, Any]] = deque(maxlen=200)
        self.preemptions: deque[dict[str, Any]] = deque(maxlen=100)
        self.candles: dict[str, dict[str, dict[str, Any]]] = {}

    def set_book(self, data: dict[str, Any]) -> None:
        self.bids = {parse_money(lv["price"]): lv["gpus"] for lv in data["bids"]}
        self.asks = {parse_money(lv["price"]): lv["gpus"] for lv in data["asks"]}

    def apply_book(self, data: dict[str, Any]) -> None:
        for name, side in (("bids", self.bids), ("asks", self.asks)):
            for lv in data.get(name, ()):
                price = parse_money(lv["price"])
                if lv["gpus"]:
                    side[price] = lv["gpus"]
                else:
                    side.pop(price, None)

    def book_levels(self) -> dict[str, list[tuple[int, int]]]:
        return {"bids": sorted(self.bids.items(), reverse=True), "asks": sorted(self.asks.items())}


class FeedClient:
    def __init__(self, base_url: str, markets: list[str], channels: list[str] | None = None, *,
                 drop: Callable[[Envelope], bool] | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.markets = list(markets)
        self.channels = list(channels or CHANNELS)
        self.views: dict[str, MarketView] = {m: MarketView() for m in self.markets}
        self.seq: dict[tuple[str, str], int] = {}
        self.awaiting: set[tuple[str, str]] = set()  # re-subscribed, waiting for the snapshot
        self.drop = drop  # a test hook: drop a message as if the network lost it
        self.gaps = 0
        self.resyncs = 0
        self.errors: list[dict[str, Any]] = []
        self.heartbeats = 0
        self.ws: ClientConnection | None = None
        self.http = httpx.AsyncClient(base_url=self.base_url, timeout=10)

    async def __aenter__(self) -> "FeedClient":
        self.ws = await websockets.connect(ws_url(self.base_url), max_size=2 ** 24)
        await self.subscribe(self.markets, self.channels)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        await self.http.aclose()

    async def subscribe(self, markets: list[str], channels: list[str]) -> None:
        for m in markets:
            self.views.setdefault(m, MarketView())
            self.awaiting.update((m, c) for c in channels)
        await self.ws.send(json.dumps({"op": "subscribe", "channels": channels, "markets": markets}))

    async def recv(self) -> Envelope:
        """Read one message, apply it to the local state, and return it."""
        raw = await self.ws.recv()
        env = envelope_decoder.decode(raw)
        if self.drop is not None and self.drop(env):
            return env
        await self.apply(env)
        return env

    async def apply(self, env: Envelope) -> None:
        if env.type == "heartbeat":
            self.heartbeats += 1
            return
        if env.type == "error":
            self.errors.append(env.data)
            return
        key = (env.market, env.channel)
        view = self.views.setdefault(env.market, MarketView())
        if env.type == "snapshot":
            self.awaiting.discard(key)
            self.seq[key] = env.seq
            self._set(view, env.channel, env.data)
            return
        if key in self.awaiting or key not in self.seq:
            return
        expected = self.seq[key] + 1
        if env.seq < expected:
            return
        if env.seq > expected:
            self.gaps += 1
            await self.resync(env, view)
            return
        self.seq[key] = env.seq
        self._update(view, env.channel, env.data)

    async def resync(self, env: Envelope, view: MarketView) -> None:
        self.resyncs += 1
        key = (env.market, env.channel)
        if env.channel == "book":
            model, tier = env.market.rsplit("/", 1)
            response = await self.http.get(f"/v1/markets/{model}/{tier}/book")
            response.raise_for_status()
            book = response.json()
            if book["seq"] >= env.seq:
                view.set_book(book)
                self.seq[key] = book["seq"]
                return
            if book["seq"] == env.seq - 1:
                view.set_book(book)
                view.apply_book(env.data)
                self.seq[key] = env.seq
                return
        # A fresh snapshot: subscribing again to what is subscribed is a no-op, so leave it first
        # (the server handles a connection's ops in order).
        await self.ws.send(json.dumps({"op": "unsubscribe", "channels": [env.channel], "markets": [env.market]}))
        await self.subscribe([env.market], [env.channel])

    def _set(self, view: MarketView, channel: str, data: Any) -> None:
        if channel == "book":
            view.set_book(data)
        elif channel == "ticker":
            view.ticker = data
        elif channel == "trades":
            view.trades.clear()
            view.trades.extend(data["trades"])
            view.preemptions.clear()
            view.preemptions.extend(data["preemptions"])
        elif channel == "candles":
            view.candles = {iv: {c["t"]: c for c in items} for iv, items in data.items()}

    def _update(self, view: MarketView, channel: str, data: Any) -> None:
        if channel == "book":
            view.apply_book(data)
        elif channel == "ticker":
            view.ticker = data
        elif channel == "trades":
            view.trades.extend(data["trades"])
            view.preemptions.extend(data["preemptions"])
        elif channel == "candles":
            for iv, candle in data.items():
                view.candles.setdefault(iv, {})[candle["t"]] = candle
