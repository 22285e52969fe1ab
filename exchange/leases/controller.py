from __future__ import annotations

from typing import Annotated

from litestar import Controller, Request, get
from litestar.params import Parameter

from exchange.core.auth import requires
from exchange.core.bounds import PathId
from exchange.core.context import AppContext
from exchange.leases import service
from exchange.leases.schemas import Lease, LeaseList, LeaseStatus, OwnerLease, OwnerLeaseList


class LeaseController(Controller):
    path = "/v1/leases"
    tags = ["leases"]
    guards = [requires("tenant", "owner", "admin")]

    @get("/")
    async def list_leases(self, ctx: AppContext, request: Request, status: LeaseStatus | None = None,
                   cursor: str | None = None, limit: Annotated[int, Parameter(ge=1, le=500)] = 100
                   ) -> LeaseList | OwnerLeaseList:
        """A tenant (and the admin) gets its leases in the tenant's view; an owner the leases on its
        hosts in the owner's view, without the tenant's limit, hold or bid id."""
        items, next_cursor = await service.list_leases(ctx, request.user, status, cursor, limit)
        if request.user.role == "owner":
            return OwnerLeaseList(items=items, next=next_cursor)
        return LeaseList(items=items, next=next_cursor)

    @get("/{lease_id:int}")
    async def get_lease(self, ctx: AppContext, request: Request, lease_id: PathId) -> Lease | OwnerLease:
        return await service.get_lease(ctx, request.user, lease_id)


class AgentLeaseController(Controller):
    """The leases on the agent's own host, so it can run its hooks and meter them."""
    path = "/v1/agent/leases"
    tags = ["agent"]
    guards = [requires("agent")]

    @get("/")
    async def list_leases(self, ctx: AppContext, request: Request, status: LeaseStatus | None = None,
                   cursor: str | None = None, limit: Annotated[int, Parameter(ge=1, le=500)] = 500
                   ) -> OwnerLeaseList:
        """In the owner's view: the agent runs the host's side, and learns no tenant limit."""
        items, next_cursor = await service.list_leases(ctx, request.user, status, cursor, limit)
        return OwnerLeaseList(items=items, next=next_cursor)
