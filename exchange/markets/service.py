from __future__ import annotations

from datetime import datetime

import asyncpg

from exchange.core.context import AppContext
from exchange.core.money import format_money
from exchange.markets.schemas import TIERS, Market


def market_id(model: str, tier: str) -> str:
    return f"{model}/{tier}"


async def ensure_markets(conn: asyncpg.Connection, models: set[str], now: datetime) -> None:
    """A market exists for each GPU model any host has reported, in both tiers."""
    rows = [(market_id(m, t), m, t, now) for m in sorted(models) for t in TIERS]
    await conn.executemany(
        "INSERT INTO markets (id, model, tier, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING", rows)


def _money(value: int | None) -> str | None:
    return None if value is None else format_money(value)


async def list_markets(ctx: AppContext) -> list[Market]:
    rows = await ctx.pool.fetch("SELECT * FROM markets ORDER BY model, tier")
    return [Market(id=r["id"], model=r["model"], tier=r["tier"], last_price=_money(r["last_price"]),
                   indicative_price=_money(r["indicative_price"]), last_trade_at=r["last_trade_at"]) for r in rows]
