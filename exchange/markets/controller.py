from __future__ import annotations

from litestar import Controller, get

from exchange.core.context import AppContext
from exchange.markets import service
from exchange.markets.schemas import Market


class MarketController(Controller):
    """Public market data: no key needed."""
    path = "/v1/markets"
    tags = ["markets"]

    @get("/")
    async def list(self, ctx: AppContext) -> list[Market]:
        return await service.list_markets(ctx)
