"""The API's refusals as exceptions: every 4xx/5xx body is `{"error": {"code", "message", "field"?}}`
(exchange/core/errors.py), its detail decoded with the server's own `ErrorDetail` struct. Some
refusals carry machine-readable hints beside "error" (a meter conflict's `expected_seq`): kept in
`extra`."""
from __future__ import annotations

import msgspec

from exchange.core.errors import ErrorDetail


class ClientError(Exception):
    """Base of everything this client raises on purpose."""


class ApiError(ClientError):
    """The server answered with an error: HTTP status, the machine-readable code, the message and,
    for a refused input, the field it names."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, object] | None = None) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}
        self.extra = extra or {}

    @property
    def retry_after_s(self) -> float | None:
        """The answer's Retry-After in seconds (a 429, or a 503 that knows when it is back)."""
        return parse_retry_after_s(self.headers.get("retry-after"))


class BadRequest(ApiError):
    """400: a malformed request."""


class Unauthorized(ApiError):
    """401: no key or an unknown key."""


class Forbidden(ApiError):
    """403: the key's role may not do this."""


class NotFound(ApiError):
    """404."""


class Conflict(ApiError):
    """409: e.g. an idempotency key reused with another body, a bid no longer open."""


class InvalidInput(ApiError):
    """422: a field outside its bounds (`field` names it)."""


class RateLimited(ApiError):
    """429: over a rate limit; `retry_after_s` when the server said."""


class ServerError(ApiError):
    """5xx."""


class ConnectionFailed(ClientError):
    """The request could not be completed over the network, after every retry allowed."""


def parse_retry_after_s(value: str | None) -> float | None:
    """Retry-After in seconds. The HTTP-date form gives None (the caller's own backoff applies):
    this API's server sends seconds."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


_BY_STATUS: dict[int, type[ApiError]] = {400: BadRequest, 401: Unauthorized, 403: Forbidden, 404: NotFound,
                                         409: Conflict, 422: InvalidInput, 429: RateLimited}


def error_from_response(status: int, body: bytes, headers: dict[str, str]) -> ApiError:
    """The exception for an error answer. A body that is not the error shape (a proxy's HTML page,
    say) still gives an ApiError, with code `http_<status>` and the start of the body as message."""
    extra: dict[str, object] = {}
    try:
        raw = msgspec.json.decode(body)
        detail = msgspec.convert(raw["error"], ErrorDetail)
        code, message, field = detail.code, detail.message, detail.field
        extra = {k: v for k, v in raw.items() if k != "error"}
    except (msgspec.DecodeError, msgspec.ValidationError, KeyError, TypeError):
        code, message, field = f"http_{status}", body[:200].decode(errors="replace"), None
    kind = _BY_STATUS.get(status) or (ServerError if status >= 500 else ApiError)
    return kind(status, code, message, field, headers, extra)
