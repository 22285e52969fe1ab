"""The service: one `create_app()`, one lifespan that owns the database, the pool and the jobs."""
from __future__ import annotations

import asyncio
import logging
import os
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

import asyncpg
from litestar import Litestar, Response, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.logging import LoggingConfig
from litestar._openapi.plugin import OpenAPIPlugin
from litestar.middleware import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController

from exchange.accounts.controller import AccountController
from exchange.bids.controller import BidController
from exchange.core.auth import ApiKeyAuthentication, hash_secret, new_api_key
from exchange.core.clock import Clock, system_clock
from exchange.core.context import AppContext
from exchange.core.errors import EXCEPTION_HANDLERS
from exchange.core.listener import CONNECTION_ERRORS, ListenOptions
from exchange.core.metrics_access import require_metrics_token
from exchange.core.openapi import document_api
from exchange.core.options import AllowHeaderMiddleware
from exchange.core.limits import RateLimitMiddleware
from exchange.core.settings import Settings
from exchange.db.embedded import start_embedded, stop_embedded
from exchange.db.migrate import MIGRATION_LOCK_KEY, apply_migrations
from exchange.db.pool import create_pool
from exchange.feed.plugin import FeedPlugin
from exchange.hosts.controller import AgentController, HostController
from exchange.leases.controller import AgentLeaseController, LeaseController
from exchange.markets.controller import MarketController
from exchange.metering.controller import MeterController
from exchange.reclaims.controller import ReclaimController
from exchange.stream.controller import stream_socket
from exchange.stream.hub import StreamHub
from exchange.offers.controller import OfferController
from exchange.scheduler import start_jobs
from exchange.webhooks.controller import WebhookController
from exchange.webhooks.delivery import WebhookDeliverer
from exchange.webhooks.resolvers import Destinations

log = logging.getLogger("exchange")

# No API key needed (/metrics checks its own token), or (/v1/stream) the websocket checks its key
# itself, also from its first message.
PUBLIC_PATHS = ["/healthz", "/metrics", "/schema", "/v1/stream"]


class MetricsController(PrometheusController):
    path = "/metrics"
    openmetrics_format = False
    guards = [require_metrics_token]  # business counters: a bearer token, not public


@get("/healthz", tags=["ops"])
async def healthz(ctx: AppContext) -> Response[dict[str, Any]]:
    """ok; "degraded" (still 200) while a LISTEN connection is down: requests are served, live feed
    and stream updates resume once it is back, so a load balancer should not pull every process over
    a database blip; "down" (503) when the database does not answer. Cheap: one SELECT 1."""
    listeners = {name: "up" if listener.up else "down"
                 for name, listener in sorted(ctx.extras.get("listeners", {}).items())}
    try:
        await asyncio.wait_for(ctx.pool.fetchval("SELECT 1"), timeout=2)  # acquiring included
        database = "ok"
    except CONNECTION_ERRORS:
        database = "down"
    status = "down" if database != "ok" else "degraded" if "down" in listeners.values() else "ok"
    return Response({"status": status, "database": database, "listeners": listeners},
                    status_code=503 if status == "down" else 200)


async def bootstrap_admin(conn: asyncpg.Connection, settings: Settings, now) -> None:
    """GPUX_ADMIN_KEY, when set, is the admin's key. Otherwise the first start generates one, writes
    it to $GPUX_HOME/admin.key (mode 0600) and prints it once."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        admin = await conn.fetchrow("SELECT id FROM accounts WHERE role = 'admin' ORDER BY id LIMIT 1")
        if settings.admin_key:
            digest = hash_secret(settings.admin_key)
            if admin is None:
                await _create_admin(conn, digest, now)
            else:
                await conn.execute("UPDATE accounts SET api_key_hash = $2 WHERE id = $1", admin["id"], digest)
            return
        if admin is not None:
            return
        key = new_api_key()
        await _create_admin(conn, hash_secret(key), now)
        key_file = Path(settings.home) / "admin.key"
        key_file.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(key + "\n")
        os.chmod(key_file, 0o600)
        print(f"admin API key (shown once, saved to {key_file}): {key}", flush=True)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


async def _create_admin(conn: asyncpg.Connection, digest: bytes, now) -> None:
    from exchange.ledger.service import open_books

    async with conn.transaction():
        account_id = await conn.fetchval(
            "INSERT INTO accounts (name, role, api_key_hash, created_at) VALUES ('admin', 'admin', $1, $2) RETURNING id",
            digest, now)
        await open_books(conn, account_id)


def create_app(settings: Settings | None = None, clock: Clock = system_clock) -> Litestar:
    settings = settings or Settings.from_env()

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        server = None
        url = settings.database_url
        if url is None:
            server, url = await asyncio.to_thread(start_embedded, settings.home)
        # Migrate before the pool opens: its connections are prepared against the final schema.
        conn = await asyncpg.connect(url)
        try:
            await apply_migrations(conn)
            await bootstrap_admin(conn, settings, clock())
        finally:
            await conn.close()
        pool = await create_pool(url)
        scheduler = None
        try:
            ctx = AppContext(settings=settings, pool=pool, clock=clock)
            ctx.extras["database_url"] = url  # the feed's channels backend listens on it
            stream_hub = StreamHub(pool, url, ListenOptions.from_settings(settings))
            await stream_hub.start()
            ctx.extras.setdefault("listeners", {})["stream"] = stream_hub.listener  # /healthz reports them
            app.state.stream_hub = stream_hub
            app.state.ctx = ctx
            # Every process runs the webhook loop (a webhook is worked by one at a time, SKIP LOCKED);
            # new events wake it, and so does a LISTEN restored (what it missed is in the table).
            destinations = ctx.extras["webhook_destinations"] = Destinations.from_settings(settings)
            deliverer = app.state.webhooks = WebhookDeliverer(ctx, destinations)
            ctx.extras["webhook_wake"] = deliverer.wake
            stream_hub.on_event.append(deliverer.wake)
            stream_hub.listener.on_restored.append(deliverer.resync)
            deliverer.start()
            if settings.run_scheduler:
                # Compile the matching kernels now (cached on disk), not in the first tick.
                from matching import warm_up

                await asyncio.to_thread(warm_up)
                scheduler, leader = start_jobs(ctx, url)
            log.info("gpu-exchange ready", extra={"fields": {"embedded": server is not None}})
            yield
        finally:
            if scheduler is not None:
                scheduler.shutdown(wait=False)
                await leader.close()
            if "webhooks" in app.state:
                await app.state.webhooks.stop()
                ctx.extras["webhook_destinations"].close()
            if "stream_hub" in app.state:
                await app.state.stream_hub.stop()
            await pool.close()
            if server is not None:
                stop_embedded(server)

    def provide_ctx(state: State) -> AppContext:
        return state.ctx

    prometheus = PrometheusConfig(app_name="gpux", group_path=True, exclude=["/metrics"])
    app = Litestar(
        route_handlers=[healthz, MetricsController, AccountController, HostController, AgentController,
                        OfferController, BidController, MarketController, LeaseController, AgentLeaseController,
                        MeterController, ReclaimController, WebhookController, stream_socket],
        lifespan=[lifespan],
        plugins=[FeedPlugin()],  # market data: /v1/feed, the channels plugin, the page at /
        dependencies={"ctx": Provide(provide_ctx, sync_to_thread=False)},
        middleware=[AllowHeaderMiddleware, prometheus.middleware, RateLimitMiddleware(exclude=("/healthz", "/metrics")),
                    DefineMiddleware(ApiKeyAuthentication, exclude=PUBLIC_PATHS)],
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=OpenAPIConfig(title="gpu-exchange", version="1.0.0", path="/schema"),
        logging_config=LoggingConfig(
            formatters={"standard": {"()": "exchange.core.logs.JsonFormatter"}},
            # exchange/core/errors.py logs each 5xx with its traceback and each 4xx on one debug
            # line; Litestar's own logging would print a traceback at error level for every 4xx.
            log_exceptions="never",
        ),
        state=State({"settings": settings}),
    )
    # The schema is built (and cached) once here, then made to say what the API really answers.
    document_api(app.plugins.get(OpenAPIPlugin).provide_openapi_schema(), settings)
    return app
