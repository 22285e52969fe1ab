from __future__ import annotations

from litestar import Controller, Request, Response, delete, get, post

from exchange.core.auth import requires
from exchange.core.bounds import PathId
from exchange.core.context import AppContext
from exchange.reclaims import service
from exchange.reclaims.schemas import Reclaim, ReclaimCreate, ReclaimList


class ReclaimController(Controller):
    path = "/v1/reclaims"
    tags = ["reclaims"]
    guards = [requires("owner")]

    @post("/", status_code=201)
    async def create(self, ctx: AppContext, request: Request, data: ReclaimCreate) -> Response[Reclaim]:
        # A retry with the same idempotency key and body answers like bids and deposits: 201 with
        # the reclaim (as it stands now) and `Idempotent-Replayed: true`.
        reclaim, replayed = await service.place_reclaim(ctx, request.user, data)
        return Response(reclaim, status_code=201, headers={"Idempotent-Replayed": "true"} if replayed else None)

    @get("/")
    async def list_reclaims(self, ctx: AppContext, request: Request) -> ReclaimList:
        return ReclaimList(items=await service.list_reclaims(ctx, request.user))

    @get("/{reclaim_id:int}")
    async def get_reclaim(self, ctx: AppContext, request: Request, reclaim_id: PathId) -> Reclaim:
        return await service.get_reclaim(ctx, request.user, reclaim_id)

    @delete("/{reclaim_id:int}", status_code=200)
    async def release(self, ctx: AppContext, request: Request, reclaim_id: PathId) -> Reclaim:
        return await service.release_reclaim(ctx, request.user, reclaim_id)
