from __future__ import annotations

from litestar import Controller, Request, get, post, put

from exchange.core.auth import requires
from exchange.core.bounds import PathId
from exchange.core.context import AppContext
from exchange.hosts import service
from exchange.offers.schemas import OfferList
from exchange.offers.service import list_offers
from exchange.hosts.schemas import AgentIdentity, Host, HostCreate, HostCreated, HostEarnings, HostList, Inventory


class HostController(Controller):
    path = "/v1/hosts"
    tags = ["hosts"]

    @post("/", guards=[requires("owner")], status_code=201)
    async def create(self, ctx: AppContext, request: Request, data: HostCreate) -> HostCreated:
        return await service.create_host(ctx, request.user.account_id, data)

    @get("/", guards=[requires("owner", "admin")])
    async def list_hosts(self, ctx: AppContext, request: Request) -> HostList:
        return HostList(items=await service.list_hosts(ctx, request.user))

    @get("/{host_id:int}", guards=[requires("owner", "admin", "agent")])
    async def get_host(self, ctx: AppContext, request: Request, host_id: PathId) -> Host:
        return await service.get_host(ctx, request.user, host_id)

    @get("/{host_id:int}/earnings", guards=[requires("owner", "admin")])
    async def earnings(self, ctx: AppContext, request: Request, host_id: PathId) -> HostEarnings:
        return await service.host_earnings(ctx, request.user, host_id)


class AgentController(Controller):
    """Endpoints for a host's agent; its token acts for that one host only."""
    path = "/v1/agent"
    tags = ["agent"]
    guards = [requires("agent")]

    @get("/me")
    async def me(self, ctx: AppContext, request: Request) -> AgentIdentity:
        return await service.agent_identity(ctx, request.user)

    @get("/offers")
    async def offers(self, ctx: AppContext, request: Request) -> OfferList:
        """The host's live offers, so the agent keeps exactly one published."""
        return OfferList(items=await list_offers(ctx, request.user, "live"))

    @put("/inventory")
    async def inventory(self, ctx: AppContext, request: Request, data: Inventory) -> Host:
        return await service.put_inventory(ctx, request.user, data)
