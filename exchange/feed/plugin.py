"""Wires the feed into the app: Litestar's channels plugin (PostgreSQL LISTEN/NOTIFY, or Redis),
this process's hub, the publisher on the matching leader's tick listeners, the websocket route and
the web page."""
from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator

import asyncpg
from litestar import Litestar
from litestar.channels import ChannelsPlugin
from litestar.config.app import AppConfig
from litestar.plugins import InitPlugin

from exchange.core.listener import ListenOptions
from exchange.feed.backend import PostgresFeedBackend, make_backend
from exchange.feed.config import FeedSettings
from exchange.feed.controller import feed_socket
from exchange.feed.hub import FeedHub
from exchange.feed.limits import SubscribeGuard
from exchange.feed.publisher import FeedPublisher
from exchange.feed.schemas import FEED_CHANNEL


class FeedPlugin(InitPlugin):
    def __init__(self, settings: FeedSettings | None = None) -> None:
        self.settings = settings
        self.channels: ChannelsPlugin | None = None
        self._dsn: str | None = None

    async def _connect(self, **kwargs: object) -> asyncpg.Connection:
        return await asyncpg.connect(self._dsn, **kwargs)

    def on_app_init(self, app_config: AppConfig) -> AppConfig:
        from exchange.web.routes import web_routes

        settings = self.settings or FeedSettings.from_env()
        backend = make_backend(settings.backend, self._connect)
        channels = self.channels = ChannelsPlugin(backend=backend, channels=[FEED_CHANNEL])

        @asynccontextmanager
        async def database_for_channels(app: Litestar) -> AsyncIterator[None]:
            # Runs after the service's lifespan (which owns the database) and before the channels plugin.
            ctx = app.state.ctx
            self._dsn = ctx.settings.database_url or ctx.extras["database_url"]
            if isinstance(backend, PostgresFeedBackend):
                backend.listen_options = ListenOptions.from_settings(ctx.settings)
            yield

        @asynccontextmanager
        async def run_feed(app: Litestar) -> AsyncIterator[None]:
            ctx = app.state.ctx
            hub = FeedHub(ctx.pool, channels, settings)
            hub.guard = SubscribeGuard(ctx.pool, ctx.settings.ws_max_markets_per_subscribe)
            await hub.start()
            app.state.feed_hub = hub
            if isinstance(backend, PostgresFeedBackend) and backend.listener is not None:
                # Updates published while the LISTEN was down never arrive: resync from the database.
                backend.listener.on_restored.append(hub.resync)
                ctx.extras.setdefault("listeners", {})["feed"] = backend.listener

            async def publish(payload: bytes) -> None:
                await channels.wait_published(payload, FEED_CHANNEL)

            publisher = FeedPublisher(ctx.pool, publish)
            ctx.extras["feed_publisher"] = publisher
            ctx.tick_listeners.append(publisher.on_tick)
            try:
                yield
            finally:
                if publisher.on_tick in ctx.tick_listeners:
                    ctx.tick_listeners.remove(publisher.on_tick)
                await hub.stop()
                connections = ctx.extras.get("ws_connections")
                if connections is not None:  # the session that names this process in ws_connections
                    await connections.close()

        app_config.lifespan.append(database_for_channels)
        channels.on_app_init(app_config)  # the `channels` dependency and its own lifespan
        app_config.lifespan.append(run_feed)
        app_config.route_handlers.extend([feed_socket, *web_routes()])
        return app_config
