from __future__ import annotations

from datetime import datetime
from typing import Annotated

from litestar import Controller, get
from litestar.params import Parameter

from exchange.core.bounds import whole
from exchange.core.context import AppContext
from exchange.markets import service
from exchange.markets.schemas import Book, CandleList, Market, RiskIndex, Ticker, TradeList


# A market's path segments, checked before any query (a NUL byte in a text parameter fails inside
# PostgreSQL): an unknown but well-formed name is a 404, a malformed one a 400 naming it.
Model = Annotated[str, Parameter(min_length=1, max_length=64, pattern=whole(r"[A-Za-z0-9][A-Za-z0-9.-]*"),
                                 description="GPU model, e.g. H100-80GB")]
Tier = Annotated[str, Parameter(min_length=1, max_length=16, pattern=whole(r"[a-z]+"), description="spot or firm")]


class MarketController(Controller):
    """Public market data: no key needed. `{model}/{tier}` names a market, e.g. H100-80GB/spot."""
    path = "/v1/markets"
    tags = ["markets"]

    @get("/")
    async def list(self, ctx: AppContext) -> list[Market]:
        return await service.list_markets(ctx)

    @get("/{model:str}/{tier:str}/book")
    async def book(self, ctx: AppContext, model: Model, tier: Tier) -> Book:
        """The L2 book as of the last auction tick, with the feed's sequence number for it."""
        return await service.get_book(ctx, model, tier)

    @get("/{model:str}/{tier:str}/ticker")
    async def ticker(self, ctx: AppContext, model: Model, tier: Tier) -> Ticker:
        return await service.get_ticker(ctx, model, tier)

    @get("/{model:str}/{tier:str}/trades")
    async def trades(self, ctx: AppContext, model: Model, tier: Tier,
                     limit: Annotated[int, Parameter(ge=1, le=1000)] = 100) -> TradeList:
        """The latest trades (oldest first) and the latest preemptions of the market."""
        return await service.get_trades(ctx, model, tier, limit)

    @get("/{model:str}/{tier:str}/candles")
    async def candles(self, ctx: AppContext, model: Model, tier: Tier, interval: str = "1m",
                      start: datetime | None = None, end: datetime | None = None,
                      limit: Annotated[int, Parameter(ge=1, le=5000)] = 500) -> CandleList:
        """OHLCV candles (1m, 5m, 1h) of the clearing prices, volume in GPU-hours."""
        return await service.get_candles(ctx, model, tier, interval, start, end, limit)

    @get("/{model:str}/{tier:str}/risk")
    async def risk(self, ctx: AppContext, model: Model, tier: Tier) -> RiskIndex:
        """The reclaim-risk index: share of spot GPU-hours preempted and the recent hazard."""
        return await service.get_risk(ctx, model, tier)
