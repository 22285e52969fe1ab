from __future__ import annotations

from typing import Literal

from litestar import Controller, Request, delete, get, post

from exchange.core.auth import requires
from exchange.core.bounds import PathId
from exchange.core.context import AppContext
from exchange.offers import service
from exchange.offers.schemas import Offer, OfferCreate, OfferList

OFFER_ROLES = ("owner", "agent", "admin")


class OfferController(Controller):
    path = "/v1/offers"
    tags = ["offers"]

    @post("/", guards=[requires("owner", "agent")], status_code=201)
    async def create(self, ctx: AppContext, request: Request, data: OfferCreate) -> Offer:
        return await service.create_offer(ctx, request.user, data)

    @get("/", guards=[requires(*OFFER_ROLES)])
    async def list_offers(self, ctx: AppContext, request: Request,
                   status: Literal["live", "withdrawn"] | None = None) -> OfferList:
        return OfferList(items=await service.list_offers(ctx, request.user, status))

    @get("/{offer_id:int}", guards=[requires(*OFFER_ROLES)])
    async def get_offer(self, ctx: AppContext, request: Request, offer_id: PathId) -> Offer:
        return await service.get_offer(ctx, request.user, offer_id)

    @delete("/{offer_id:int}", guards=[requires("owner", "agent")], status_code=200)
    async def withdraw(self, ctx: AppContext, request: Request, offer_id: PathId) -> Offer:
        return await service.withdraw_offer(ctx, request.user, offer_id)
