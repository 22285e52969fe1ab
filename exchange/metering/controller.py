from __future__ import annotations

from litestar import Controller, Request, post

from exchange.core.auth import requires
from exchange.core.context import AppContext
from exchange.metering import service
from exchange.metering.schemas import MeterAck, MeterReport


class MeterController(Controller):
    path = "/v1/agent/meter"
    tags = ["agent"]
    guards = [requires("agent")]

    @post("/", status_code=200, request_max_body_size=16 * 1024 * 1024)
    async def report(self, ctx: AppContext, request: Request, data: MeterReport) -> MeterAck:
        return await service.ingest_report(ctx, request.user, data)
