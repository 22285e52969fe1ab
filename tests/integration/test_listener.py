"""exchange/core/listener.py against a real PostgreSQL: a LISTEN connection that the server closes
(pg_terminate_backend) or that silently stops answering (a network that drops everything, played by
a socket proxy) is noticed, reconnected, resynced (its `on_restored` runs) and hears notifications
again; a failed first attempt backs off and retries."""
from __future__ import annotations

import asyncio
from functools import partial
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg

from exchange.core.listener import Listener, ListenOptions
from exchange.core.metrics import LISTENER_LOSSES, LISTENER_RECONNECTS, LISTENER_UP

FAST = ListenOptions(retry_min_s=0.05, retry_max_s=0.2, check_s=0.5)
BOUND_S = 20  # a liveness bound, not a timing claim


class Heard:
    def __init__(self) -> None:
        self.payloads: asyncio.Queue[str] = asyncio.Queue()
        self.restored = 0
        self.restored_event = asyncio.Event()

    def notified(self, _conn, _pid, _channel, payload: str) -> None:
        self.payloads.put_nowait(payload)

    async def on_restored(self) -> None:
        self.restored += 1
        self.restored_event.set()

    async def next(self) -> str:
        return await asyncio.wait_for(self.payloads.get(), BOUND_S)


def counter(metric, name: str) -> float:
    return metric.labels(name)._value.get()


async def listening(name: str, connect, options: ListenOptions = FAST) -> tuple[Listener, Heard]:
    heard = Heard()
    listener = Listener(name, connect, options)
    listener.on_restored.append(heard.on_restored)
    await listener.start()
    await listener.add("gpux_listener_test", heard.notified)
    return listener, heard


async def test_a_terminated_listener_reconnects_resyncs_and_hears_again(db_url: str) -> None:
    name = f"t{id(db_url)}"
    listener, heard = await listening(name, partial(asyncpg.connect, db_url))
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("SELECT pg_notify('gpux_listener_test', 'before')")
        assert await heard.next() == "before"
        losses = counter(LISTENER_LOSSES, name)

        killed = await conn.fetchval(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name = $1", f"gpux-listen-{name}")
        assert killed == 1
        await asyncio.wait_for(heard.restored_event.wait(), BOUND_S)

        assert listener.up and listener.reconnects == 1 and heard.restored == 1
        assert counter(LISTENER_LOSSES, name) == losses + 1 and counter(LISTENER_RECONNECTS, name) == 1
        assert LISTENER_UP.labels(name)._value.get() == 1
        await conn.execute("SELECT pg_notify('gpux_listener_test', 'after')")
        assert await heard.next() == "after"
    finally:
        await conn.close()
        await listener.stop()
    assert not listener.up


class FreezingProxy:
    """A Unix-socket proxy in front of PostgreSQL that can go silent on the connections it carries
    (bytes swallowed both ways, sockets left open), as a dropped network does; new connections pass."""

    def __init__(self, upstream: str, folder: Path, port: int) -> None:
        self.upstream = upstream
        self.path = str(folder / f".s.PGSQL.{port}")
        self.frozen: set[asyncio.StreamWriter] = set()
        self.live: set[asyncio.StreamWriter] = set()
        self.server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, path=self.path)

    def freeze(self) -> None:
        self.frozen |= self.live

    async def close(self) -> None:
        self.server.close()
        for writer in self.live:
            writer.close()

    async def _serve(self, client_reader, client_writer) -> None:
        server_reader, server_writer = await asyncio.open_unix_connection(self.upstream)
        self.live.add(client_writer)

        async def pump(reader, writer) -> None:
            try:
                while data := await reader.read(65536):
                    if client_writer not in self.frozen:
                        writer.write(data)
                        await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        await asyncio.gather(pump(client_reader, server_writer), pump(server_reader, client_writer))
        self.live.discard(client_writer)


async def test_a_silently_dropped_listener_is_found_by_its_check_and_reconnected(db_url: str, tmp_path) -> None:
    parts = urlsplit(db_url)
    socket_dir = parse_qs(parts.query).get("host", [None])[0]
    port = parts.port or 5432
    assert socket_dir, "this test proxies the Unix socket of DATABASE_URL's server"
    proxy = FreezingProxy(f"{socket_dir}/.s.PGSQL.{port}", tmp_path, port)
    await proxy.start()
    name = f"s{id(proxy)}"
    connect = partial(asyncpg.connect, host=str(tmp_path), port=port, user=parts.username or "postgres",
                      database=parts.path.lstrip("/"))
    listener, heard = await listening(name, connect)
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("SELECT pg_notify('gpux_listener_test', 'before')")
        assert await heard.next() == "before"

        proxy.freeze()  # the connection stays open; nothing gets through, no termination callback fires
        await asyncio.wait_for(heard.restored_event.wait(), BOUND_S)

        assert listener.up and listener.reconnects == 1 and counter(LISTENER_LOSSES, name) == 1
        await conn.execute("SELECT pg_notify('gpux_listener_test', 'after')")
        assert await heard.next() == "after"
    finally:
        await conn.close()
        await listener.stop()
        await proxy.close()


async def test_reconnect_attempts_back_off_until_the_database_takes_them(db_url: str) -> None:
    name = f"b{id(db_url)}"
    refusals = 3
    attempts = 0

    async def flaky_connect(**kwargs):
        nonlocal attempts
        attempts += 1
        if 1 < attempts <= 1 + refusals:  # the first (start) succeeds, then the database "is restarting"
            raise ConnectionRefusedError("database restarting")
        return await asyncpg.connect(db_url, **kwargs)

    listener, heard = await listening(name, flaky_connect)
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                           " WHERE datname = current_database() AND application_name = $1", f"gpux-listen-{name}")
        await asyncio.wait_for(heard.restored_event.wait(), BOUND_S)
        assert attempts == 2 + refusals and listener.reconnects == 1 and heard.restored == 1
        await conn.execute("SELECT pg_notify('gpux_listener_test', 'after')")
        assert await heard.next() == "after"
    finally:
        await conn.close()
        await listener.stop()
