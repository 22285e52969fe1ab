"""Who may read /metrics: its counters are business figures (bids, fills, money settled, deposits),
so they are not public. A bearer token, not a separate bind address: it works the same behind a
proxy, with --workers N (every worker answers on one port) and in a cluster, and Prometheus sends it
natively (`authorization: {credentials: …}`). The check costs no database query, so an anonymous
flood on /metrics costs no more than one on /healthz."""
from __future__ import annotations

import hmac

from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from exchange.core.errors import ApiError
from exchange.core.settings import Settings


def metrics_tokens(settings: Settings) -> list[bytes]:
    """GPUX_METRICS_TOKEN and GPUX_ADMIN_KEY, those that are set."""
    return [token.encode() for token in (settings.metrics_token, settings.admin_key) if token]


def require_metrics_token(connection: ASGIConnection, _: BaseRouteHandler) -> None:
    """Litestar guard: `Authorization: Bearer <token>` with one of `metrics_tokens`, else 401."""
    tokens = metrics_tokens(connection.app.state.settings)
    scheme, _, credentials = connection.headers.get("authorization", "").strip().partition(" ")
    offered = credentials.strip().encode()
    # compare_digest against every token: the time taken does not tell which one nearly matched.
    matched = [hmac.compare_digest(offered, token) for token in tokens]
    if scheme.lower() == "bearer" and offered and any(matched):
        return
    message = ("/metrics needs `Authorization: Bearer <GPUX_METRICS_TOKEN or the admin key>`" if tokens else
               "/metrics is closed: set GPUX_METRICS_TOKEN (or GPUX_ADMIN_KEY) on the server to scrape it")
    raise ApiError("unauthorized", message, status=401, headers={"WWW-Authenticate": 'Bearer realm="metrics"'})
