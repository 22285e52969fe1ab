"""One PostgreSQL LISTEN connection that comes back after it is lost.

A LISTEN lives on one connection: when PostgreSQL restarts, or an operator terminates the backend,
or the network drops, every notification after that is lost to this process, and nothing says so.
`Listener` notices the loss two ways: asyncpg's termination callback (the server closed the
connection: restart, pg_terminate_backend) and a periodic `SELECT 1` with a timeout (a silent network
drop that no callback reports). It then reconnects with exponential backoff and jitter (bounded),
LISTENs again on every channel it holds, and runs its `on_restored` callbacks: what was notified while
it was down never arrives, so each user resyncs from the database there (the feed hub reloads its
markets and sends fresh snapshots, the stream hub delivers each socket's events after its last seq).

Lost is logged at warning, back at info; `gpux_listener_up{listener}` and
`gpux_listener_reconnects_total{listener}` are exported at /metrics, and /healthz reports
"degraded" while a listener is down."""
from __future__ import annotations

import asyncio
import logging
import random
from typing import Any, Awaitable, Callable

import asyncpg
import msgspec

from exchange.core.metrics import LISTENER_LOSSES, LISTENER_RECONNECTS, LISTENER_UP

log = logging.getLogger(__name__)

Connect = Callable[..., Awaitable[asyncpg.Connection]]
Callback = Callable[[asyncpg.Connection, int, str, Any], None]
Restored = Callable[[], Awaitable[None]]
# What a lost connection raises (or a timed-out check); anything else is a bug and propagates.
CONNECTION_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


class ListenOptions(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # First reconnect delay; each failed attempt doubles it, up to retry_max_s (each delay jittered
    # down to half, so that many processes do not reconnect in lockstep after a restart).
    retry_min_s: float = 0.1
    retry_max_s: float = 5.0
    # How often the connection is checked with `SELECT 1` (which must answer within as long).
    check_s: float = 5.0

    @classmethod
    def from_settings(cls, settings: Any) -> "ListenOptions":
        return cls(retry_min_s=settings.listen_retry_min_s, retry_max_s=settings.listen_retry_max_s,
                   check_s=settings.listen_check_s)


class Listener:
    def __init__(self, name: str, connect: Connect, options: ListenOptions | None = None) -> None:
        self.name = name
        self._connect = connect
        self.options = options or ListenOptions()
        self.channels: dict[str, Callback] = {}
        self.on_restored: list[Restored] = []
        self.reconnects = 0
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # one operation at a time on the connection (asyncpg requires it)
        self._lost = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False

    @property
    def up(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.is_closed() and not self._lost.is_set()

    # --- lifecycle --------------------------------------------------------------------------------
    async def start(self) -> None:
        """Connect (a first failure propagates: the server should not start without its database)."""
        async with self._lock:
            await self._open()
        LISTENER_UP.labels(self.name).set(1)
        self._task = asyncio.get_running_loop().create_task(self._supervise(), name=f"listener-{self.name}")

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        async with self._lock:
            await self._close()

    async def add(self, channel: str, callback: Callback) -> None:
        async with self._lock:
            self.channels[channel] = callback
            if self.up:
                try:
                    await self._conn.add_listener(channel, callback)  # type: ignore[union-attr]
                except CONNECTION_ERRORS:
                    self._lost.set()  # the reconnect LISTENs on it with the others

    async def remove(self, channel: str) -> None:
        async with self._lock:
            callback = self.channels.pop(channel, None)
            if callback is not None and self.up:
                try:
                    await self._conn.remove_listener(channel, callback)  # type: ignore[union-attr]
                except CONNECTION_ERRORS:
                    self._lost.set()

    # --- the connection ---------------------------------------------------------------------------
    async def _open(self) -> None:
        conn = await self._connect(server_settings={"application_name": f"gpux-listen-{self.name}"})
        try:
            conn.add_termination_listener(self._terminated)
            for channel, callback in self.channels.items():
                await conn.add_listener(channel, callback)
        except BaseException:
            conn.terminate()
            raise
        self._conn = conn
        self._lost.clear()

    async def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        conn.remove_termination_listener(self._terminated)
        try:
            await asyncio.wait_for(conn.close(), timeout=self.options.check_s)
        except CONNECTION_ERRORS:
            conn.terminate()

    def _terminated(self, conn: asyncpg.Connection) -> None:
        if conn is self._conn and not self._stopping:
            self._lost.set()

    async def _check(self) -> None:
        async with self._lock:
            if self._lost.is_set() or self._conn is None:
                return
            try:
                await self._conn.fetchval("SELECT 1", timeout=self.options.check_s)
            except CONNECTION_ERRORS:
                self._lost.set()

    async def _supervise(self) -> None:
        while True:
            try:
                try:
                    await asyncio.wait_for(self._lost.wait(), timeout=self.options.check_s)
                except asyncio.TimeoutError:
                    await self._check()
                    continue
                await self._recover()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A supervisor that died would be the silent failure this module exists to prevent:
                # treat whatever happened as a lost connection and go on.
                log.exception("LISTEN connection %s: supervision failed; treating the connection as lost", self.name)
                self._lost.set()
                await asyncio.sleep(self.options.retry_max_s)

    async def _recover(self) -> None:
        LISTENER_UP.labels(self.name).set(0)
        LISTENER_LOSSES.labels(self.name).inc()
        log.warning("LISTEN connection %s lost; reconnecting (notifications until then are missed; resync after)",
                    self.name)
        delay = self.options.retry_min_s
        attempts = 0
        while True:
            await asyncio.sleep(random.uniform(delay / 2, delay))
            attempts += 1
            async with self._lock:
                old, self._conn = self._conn, None
                if old is not None:
                    old.remove_termination_listener(self._terminated)
                    old.terminate()  # whatever state it is in: its server side is gone or unreachable
                try:
                    await asyncio.wait_for(self._open(), timeout=max(self.options.check_s, 1.0))
                except CONNECTION_ERRORS as exc:
                    if attempts == 1 or attempts % 10 == 0:
                        log.warning("LISTEN connection %s: reconnect attempt %d failed: %s", self.name, attempts, exc)
                    delay = min(delay * 2, self.options.retry_max_s)
                    continue
            break
        self.reconnects += 1
        LISTENER_RECONNECTS.labels(self.name).inc()
        LISTENER_UP.labels(self.name).set(1)
        log.info("LISTEN connection %s back after %d attempt(s); resyncing from the database", self.name, attempts)
        for restored in list(self.on_restored):
            try:
                await restored()
            except Exception:
                log.exception("resync after the %s listener came back failed", self.name)
