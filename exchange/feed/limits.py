"""What one /v1/feed message may cost: a subscribe names at most GPUX_WS_MAX_MARKETS_PER_SUBSCRIBE
markets (refused whole, before any work, when it names more), and the markets it names that this
process has not seen yet are checked in one query, not one per market."""
from __future__ import annotations

import asyncpg


class KnownMarkets:
    """Market ids seen to exist (markets are only ever added: a host reporting a new GPU model, so
    the set stays as small as the markets table)."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.ids: set[str] = set()

    async def unknown(self, markets: list[str]) -> list[str]:
        """Those of `markets` that do not exist: no query when all are known, else one."""
        missing = [m for m in markets if m not in self.ids]
        if not missing:
            return []
        found = {r["id"] for r in await self.pool.fetch("SELECT id FROM markets WHERE id = ANY($1::text[])", missing)}
        self.ids |= found
        return [m for m in missing if m not in found]


class SubscribeGuard:
    def __init__(self, pool: asyncpg.Pool, max_markets: int) -> None:
        self.max_markets = max_markets
        self.known = KnownMarkets(pool)
