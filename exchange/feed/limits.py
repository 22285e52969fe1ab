"""What one /v1/feed message may cost: a subscribe names at most GPUX_WS_MAX_MARKETS_PER_SUBSCRIBE
markets (refused whole, before any work, when it names more), and a market this process has not
seen is looked up in one cached list of market ids, refreshed at most once per
KNOWN_MARKETS_REFRESH_S, so that naming unknown markets costs no query each."""
from __future__ import annotations

import asyncio
import time

import asyncpg

KNOWN_MARKETS_REFRESH_S = 1.0


class KnownMarkets:
    """The ids in `markets` (they are only ever added: a host reporting a new GPU model)."""

    def __init__(self, pool: asyncpg.Pool, refresh_s: float = KNOWN_MARKETS_REFRESH_S) -> None:
        self.pool = pool
        self.refresh_s = refresh_s
        self.ids: frozenset[str] = frozenset()
        self._loaded_at: float | None = None
        self._lock = asyncio.Lock()

    async def unknown(self, markets: list[str]) -> list[str]:
        """Those of `markets` that do not exist (as of at most refresh_s ago when any is missing)."""
        missing = [m for m in markets if m not in self.ids]
        if not missing:
            return []
        async with self._lock:
            now = time.monotonic()
            if self._loaded_at is None or now - self._loaded_at >= self.refresh_s:
                self.ids = frozenset(r["id"] for r in await self.pool.fetch("SELECT id FROM markets"))
                self._loaded_at = time.monotonic()
        return [m for m in missing if m not in self.ids]


class SubscribeGuard:
    def __init__(self, pool: asyncpg.Pool, max_markets: int) -> None:
        self.max_markets = max_markets
        self.known = KnownMarkets(pool)
