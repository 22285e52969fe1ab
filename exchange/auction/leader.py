"""One matching leader among all server processes: whoever holds a PostgreSQL advisory lock on a
dedicated connection runs the ticks; if it dies, its connection closes, the lock frees, and another
process takes over on its next attempt (and rebuilds its book from the database)."""
from __future__ import annotations

import logging
from typing import Callable

import asyncpg
from matching import ModelBook

from exchange.auction.book_sync import BookSync
from exchange.auction.service import TickSummary, run_tick
from exchange.core import metrics
from exchange.core.context import AppContext
from exchange.leases.lifecycle import fail_silent_hosts

log = logging.getLogger(__name__)
TICK_LOCK_KEY = 0x6770_7578_0002


class MatchingLeader:
    def __init__(self, ctx: AppContext, dsn: str, book_factory: Callable[[], ModelBook] = ModelBook) -> None:
        self.ctx = ctx
        self.dsn = dsn
        self.conn: asyncpg.Connection | None = None
        self.sync: BookSync | None = None
        # The engine's book per model (the simulation passes one that also clears with the reference).
        self.book_factory = book_factory

    async def _lead(self) -> bool:
        if self.conn is not None and not self.conn.is_closed():
            return True
        self.conn = await asyncpg.connect(self.dsn)
        if await self.conn.fetchval("SELECT pg_try_advisory_lock($1)", TICK_LOCK_KEY):
            # A new leader loads the whole book once (every open bid, live offer and incumbent),
            # then only changes.
            self.sync = BookSync(book_factory=self.book_factory)
            log.info("this process now runs the auction ticks")
            return True
        await self.conn.close()
        self.conn = None
        return False

    async def tick(self) -> TickSummary | None:
        if not await self._lead():
            return None
        settings = self.ctx.settings
        try:
            now = self.ctx.clock()
            # Hosts gone dark free their GPUs before the market clears.
            await fail_silent_hosts(self.conn, now, grace_s=settings.host_grace_s, fail_s=settings.host_fail_s)
            summary = await run_tick(self.conn, self.sync, now)
        except (asyncpg.PostgresConnectionError, asyncpg.InterfaceError, OSError):
            log.exception("lost the database during a tick; giving up leadership")
            await self.close()
            return None
        except Exception:
            # Whatever failed, the engine may hold what the database does not (winners taken out,
            # loads half applied): the next tick starts from a book rebuilt from the database.
            self.sync = BookSync(book_factory=self.book_factory)
            raise
        try:
            await self._measure_drift()
        except Exception:  # a measurement must never stop the market
            log.exception("measuring the book's drift failed")
        for listener in self.ctx.tick_listeners:
            try:
                await listener(summary)
            except Exception:  # market data must never stop the market
                log.exception("tick listener %r failed", listener)
        return summary

    async def _measure_drift(self) -> None:
        """Publish how far the book is from the database. Cheap on a healthy book: the full
        comparison runs only when the count or the id sum of the open bids differs from the
        engines' (a bid placed or cancelled since the last load also makes them differ)."""
        count, total = await self.conn.fetchrow(
            "SELECT count(*), coalesce(sum(id), 0)::bigint FROM bids WHERE status = 'open'")
        if (count, total) == self.sync.engine_totals() and not self.sync.rebuild:
            missing, extra = [], []
        else:
            missing, extra = await self.sync.book_drift(self.conn)
        metrics.BOOK_DRIFT_BIDS.labels("missing").set(len(missing))
        metrics.BOOK_DRIFT_BIDS.labels("extra").set(len(extra))
        if missing or extra:
            log.error("matching book drift after the tick: missing %s, extra %s", missing[:20], extra[:20])

    async def close(self) -> None:
        if self.conn is not None:
            try:
                await self.conn.close()
            finally:
                self.conn = None
                self.sync = None
