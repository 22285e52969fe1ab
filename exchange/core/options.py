"""`OPTIONS` answers with every method its path serves.

Litestar (2.25) builds a path's automatic OPTIONS handler when it first creates the path's route and
never again: a path whose handlers are separate functions (GET and DELETE of `/v1/bids/{id}`, GET and
POST of `/v1/bids`) is re-created for each, keeping the first OPTIONS handler, whose `Allow` names
only the methods known then. This middleware rewrites `Allow` on OPTIONS answers from the routes as
finally registered."""
from __future__ import annotations

from litestar.routes import HTTPRoute
from litestar.types import ASGIApp, Message, Receive, Scope, Send


class AllowHeaderMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._allow: dict[str, bytes] | None = None

    def _allow_by_path(self, scope: Scope) -> dict[str, bytes]:
        if self._allow is None:
            allow: dict[str, bytes] = {}
            for route in scope["litestar_app"].routes:
                if isinstance(route, HTTPRoute):
                    value = ", ".join(sorted(route.methods)).encode()
                    allow[route.path] = allow[route.path_format] = value
            self._allow = allow
        return self._allow

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "OPTIONS":
            await self.app(scope, receive, send)
            return
        allow = self._allow_by_path(scope).get(scope.get("path_template", ""))

        async def send_with_allow(message: Message) -> None:
            if allow is not None and message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"allow"]
                message = {**message, "headers": [*headers, (b"allow", allow)]}
            await send(message)

        await self.app(scope, receive, send_with_allow)
