"""Channels backends for the feed. PostgreSQL LISTEN/NOTIFY by default: Litestar's asyncpg backend,
publishing on one kept connection (the stock backend opens a connection per message) and listening on
a `Listener` that reconnects (the stock backend's LISTEN connection never comes back once lost).
Redis, for larger fleets, with GPUX_FEED_BACKEND=redis://host:6379/0 and the `redis` package installed."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Iterable

import asyncpg
from litestar.channels import ChannelsBackend
from litestar.channels.backends.asyncpg import AsyncPgChannelsBackend

from exchange.core.listener import Listener, ListenOptions


class PostgresFeedBackend(AsyncPgChannelsBackend):
    def __init__(self, make_connection: Callable[..., Awaitable[asyncpg.Connection]]) -> None:
        super().__init__(make_connection=make_connection)
        self._publisher: asyncpg.Connection | None = None
        self._publish_lock: asyncio.Lock | None = None
        self.listen_options = ListenOptions()  # set from the service's settings before startup
        self.listener: Listener | None = None

    async def on_startup(self) -> None:
        self._queue = asyncio.Queue()
        self.listener = Listener("feed", self._connect, self.listen_options)
        await self.listener.start()
        self._publish_lock = asyncio.Lock()

    async def on_shutdown(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()
            self._publisher = None
        if self.listener is not None:
            await self.listener.stop()
        self._subscribed_channels.clear()
        self._queue = None

    async def subscribe(self, channels: Iterable[str]) -> None:
        for channel in set(channels) - self._subscribed_channels:
            await self.listener.add(channel, self._listener)  # type: ignore[union-attr]
            self._subscribed_channels.add(channel)

    async def unsubscribe(self, channels: Iterable[str]) -> None:
        for channel in set(channels) & self._subscribed_channels:
            self._subscribed_channels.discard(channel)
            await self.listener.remove(channel)  # type: ignore[union-attr]

    async def publish(self, data: bytes, channels: Iterable[str]) -> None:
        if self._publish_lock is None:
            raise RuntimeError("Backend not yet initialized. Did you forget to call on_startup?")
        text = data.decode("utf-8")
        async with self._publish_lock:
            for attempt in (1, 2):  # one reconnect if the kept connection went away
                try:
                    if self._publisher is None or self._publisher.is_closed():
                        self._publisher = await self._connect()
                    for channel in channels:
                        await self._publisher.execute("SELECT pg_notify($1, $2)", channel, text)
                    return
                except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
                    self._publisher = None
                    if attempt == 2:
                        raise

    @property
    def listener_alive(self) -> bool:
        return self.listener is not None and self.listener.up


def make_backend(kind: str, make_connection: Callable[..., Awaitable[asyncpg.Connection]]) -> ChannelsBackend:
    if kind == "postgres":
        return PostgresFeedBackend(make_connection)
    try:
        from redis.asyncio import Redis

        from litestar.channels.backends.redis import RedisChannelsPubSubBackend
    except ImportError as exc:  # pragma: no cover - optional
        raise RuntimeError("GPUX_FEED_BACKEND=redis://… needs the redis package: pip install redis") from exc
    return RedisChannelsPubSubBackend(redis=Redis.from_url(kind))
