"""Channels backends for the feed. PostgreSQL LISTEN/NOTIFY by default: Litestar's asyncpg backend,
publishing on one kept connection (the stock backend opens a connection per message). Redis, for
larger fleets, with GPUX_FEED_BACKEND=redis://host:6379/0 and the `redis` package installed."""
from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, Iterable

import asyncpg
from litestar.channels import ChannelsBackend
from litestar.channels.backends.asyncpg import AsyncPgChannelsBackend


class PostgresFeedBackend(AsyncPgChannelsBackend):
    def __init__(self, make_connection: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        super().__init__(make_connection=make_connection)
        self._publisher: asyncpg.Connection | None = None
        self._publish_lock: asyncio.Lock | None = None

    async def on_startup(self) -> None:
        await super().on_startup()
        self._publish_lock = asyncio.Lock()

    async def on_shutdown(self) -> None:
        if self._publisher is not None:
            await self._publisher.close()
            self._publisher = None
        await super().on_shutdown()

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
        conn = getattr(self, "_listener_conn", None)
        return conn is not None and not conn.is_closed()


def make_backend(kind: str, make_connection: Callable[[], Awaitable[asyncpg.Connection]]) -> ChannelsBackend:
    if kind == "postgres":
        return PostgresFeedBackend(make_connection)
    try:
        from redis.asyncio import Redis

        from litestar.channels.backends.redis import RedisChannelsPubSubBackend
    except ImportError as exc:  # pragma: no cover - optional
        raise RuntimeError("GPUX_FEED_BACKEND=redis://… needs the redis package: pip install redis") from exc
    return RedisChannelsPubSubBackend(redis=Redis.from_url(kind))
