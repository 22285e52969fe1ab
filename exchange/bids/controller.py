from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, Response, delete, get, post
from litestar.params import Parameter

from exchange.bids import service
from exchange.bids.quote import quote_bid
from exchange.bids.schemas import Bid, BidCost, BidCreate, BidList, BidStatus, Quote, QuoteRequest
from exchange.core.auth import requires
from exchange.core.bounds import PathId
from exchange.core.context import AppContext
from exchange.core.limits import take_quote


class BidController(Controller):
    path = "/v1/bids"
    tags = ["bids"]
    guards = [requires("tenant")]

    @post("/", status_code=201)
    async def place(self, ctx: AppContext, request: Request, data: BidCreate) -> Response[Bid]:
        bid, replayed = await service.place_bid(ctx, request.user.account_id, data)
        return Response(bid, status_code=201, headers={"Idempotent-Replayed": "true"} if replayed else None)

    @post("/quote", status_code=200)
    async def quote(self, ctx: AppContext, request: Request, data: QuoteRequest) -> Quote:
        """A dry run of a bid: what these terms would get if the market cleared now. Writes nothing.
        Limited per account beyond the request limit (GPUX_QUOTE_LIMIT_PER_S): a quote rebuilds its
        model's book, so quotes are what a tenant could spend the server's CPU with."""
        await take_quote(ctx, request.user.account_id)
        return await quote_bid(ctx, request.user.account_id, data)

    @get("/")
    async def list_bids(self, ctx: AppContext, request: Request, status: BidStatus | None = None,
                   cursor: str | None = None, limit: Annotated[int, Parameter(ge=1, le=500)] = 100) -> BidList:
        items, next_cursor = await service.list_bids(ctx, request.user.account_id, status, cursor, limit)
        return BidList(items=items, next=next_cursor)

    @get("/{bid_id:int}")
    async def get_bid(self, ctx: AppContext, request: Request, bid_id: PathId) -> Bid:
        return await service.get_bid(ctx, request.user.account_id, bid_id)

    @get("/{bid_id:int}/cost")
    async def cost(self, ctx: AppContext, request: Request, bid_id: PathId) -> BidCost:
        return await service.bid_cost(ctx, request.user.account_id, bid_id)

    @delete("/{bid_id:int}", status_code=200)
    async def cancel(self, ctx: AppContext, request: Request, bid_id: PathId) -> Bid:
        return await service.cancel_bid(ctx, request.user.account_id, bid_id)
