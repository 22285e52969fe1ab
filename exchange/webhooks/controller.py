from __future__ import annotations

from litestar import Controller, Request, delete, get, post

from exchange.core.auth import requires
from exchange.core.bounds import PathId
from exchange.core.context import AppContext
from exchange.webhooks import service
from exchange.webhooks.schemas import Delivery, DeliveryList, Webhook, WebhookCreate, WebhookList


class WebhookController(Controller):
    path = "/v1/webhooks"
    tags = ["webhooks"]
    guards = [requires("tenant", "owner")]

    @post("/", status_code=201)
    async def create(self, ctx: AppContext, request: Request, data: WebhookCreate) -> Webhook:
        return await service.create_webhook(ctx, request.user, data)

    @get("/")
    async def list_webhooks(self, ctx: AppContext, request: Request) -> WebhookList:
        return WebhookList(items=await service.list_webhooks(ctx, request.user))

    @delete("/{webhook_id:int}", status_code=200)
    async def remove(self, ctx: AppContext, request: Request, webhook_id: PathId) -> Webhook:
        return await service.delete_webhook(ctx, request.user, webhook_id)

    @post("/{webhook_id:int}/enable", status_code=200)
    async def enable(self, ctx: AppContext, request: Request, webhook_id: PathId) -> Webhook:
        return await service.enable_webhook(ctx, principal=request.user, webhook_id=webhook_id)

    @get("/{webhook_id:int}/deliveries")
    async def deliveries(self, ctx: AppContext, request: Request, webhook_id: PathId) -> DeliveryList:
        return DeliveryList(items=await service.list_deliveries(ctx, request.user, webhook_id))

    @post("/{webhook_id:int}/test", status_code=202)
    async def test(self, ctx: AppContext, request: Request, webhook_id: PathId) -> Delivery:
        return await service.queue_ping(ctx, request.user, webhook_id)
