"""One error shape for every 4xx: {"error": {"code", "message", "field"?}}, machine-readable."""
from __future__ import annotations

import logging
import re
import traceback

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from exchange.core.structs import Struct


class ErrorDetail(Struct, frozen=True, kw_only=True, omit_defaults=True):
    code: str
    message: str
    field: str | None = None


class ErrorBody(Struct, frozen=True, kw_only=True):
    error: ErrorDetail


class ApiError(Exception):
    """A refusal the client can act on. Raised by services; rendered by `api_error_handler`."""

    status_code = 400

    def __init__(self, code: str, message: str, *, field: str | None = None, status: int | None = None,
                 headers: dict[str, str] | None = None, extra: dict[str, object] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}
        # Machine-readable hints beside "error" (e.g. a meter conflict's `expected_seq`).
        self.extra = extra or {}
        if status is not None:
            self.status_code = status


class InvalidField(ApiError):
    status_code = 422

    def __init__(self, field: str, message: str) -> None:
        super().__init__("invalid_field", f"{field}: {message}", field=field)


class NotFound(ApiError):
    status_code = 404

    def __init__(self, what: str) -> None:
        super().__init__("not_found", f"{what} not found")


class Conflict(ApiError):
    status_code = 409

    def __init__(self, code: str, message: str, field: str | None = None,
                 extra: dict[str, object] | None = None) -> None:
        super().__init__(code, message, field=field, extra=extra)


class InsufficientFunds(ApiError):
    status_code = 402

    def __init__(self, needed: str, available: str) -> None:
        super().__init__("insufficient_funds",
                         f"this order needs a hold of {needed} but only {available} is available")


class Forbidden(ApiError):
    status_code = 403

    def __init__(self, message: str) -> None:
        super().__init__("forbidden", message)


log = logging.getLogger("exchange.errors")
_error_encoder = msgspec.json.Encoder()
_FIELD_IN_MESSAGE = re.compile(r"field `([^`]+)`")


def _response(status: int, detail: ErrorDetail, headers: dict[str, str] | None = None,
              extra: dict[str, object] | None = None) -> Response[bytes]:
    body = {"error": detail, **extra} if extra else ErrorBody(error=detail)
    return Response(_error_encoder.encode(body), status_code=status, media_type="application/json", headers=headers)


def _log_refusal(request: Request, status: int, code: str) -> None:
    """A 4xx is the client's mistake, not ours: one line at debug, no traceback (a hostile client
    would otherwise fill the error log)."""
    log.debug("refused", extra={"fields": {"method": request.method, "path": request.url.path, "status": status,
                                           "code": code}})


def api_error_handler(request: Request, exc: ApiError) -> Response[bytes]:
    _log_refusal(request, exc.status_code, exc.code)
    return _response(exc.status_code, ErrorDetail(code=exc.code, message=exc.message, field=exc.field), exc.headers,
                     exc.extra)


def validation_error_handler(request: Request, exc: ValidationException) -> Response[bytes]:
    """Litestar's body validation (msgspec) names the key; unknown and missing fields name it only in
    the message, so pull it out from there."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    first = extra[0] if extra and isinstance(extra[0], dict) else {}
    message = str(first.get("message") or exc.detail)
    key = first.get("key")
    found = _FIELD_IN_MESSAGE.search(message)
    field = found.group(1) if found else (key if key not in (None, "data") else None)
    code = "malformed_body" if not extra else "invalid_field"
    text = f"{field}: {message}" if field else message
    _log_refusal(request, 400, code)
    return _response(400, ErrorDetail(code=code, message=text, field=field))


_CODES = {400: "malformed_body", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          409: "conflict", 413: "too_large", 429: "rate_limited"}


def http_error_handler(request: Request, exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    if status >= 500 and exc.detail == "client disconnected prematurely":
        # Litestar's 500 for a client that hung up mid-body: nobody reads this answer, and it is not
        # our fault, so no traceback at error level.
        _log_refusal(request, 400, "client_disconnected")
        return _response(400, ErrorDetail(code="client_disconnected", message=str(exc.detail)))
    if status >= 500:
        return internal_error_handler(request, exc, status)
    headers = dict(exc.headers or {})
    if status == 429:
        # RFC 9110: tell the client when to come back (Litestar gives only RateLimit-Reset).
        headers["Retry-After"] = str(max(1, int(headers.get("RateLimit-Reset", "1") or 1)))
    code = _CODES.get(status, "bad_request")
    _log_refusal(request, status, code)
    return _response(status, ErrorDetail(code=code, message=str(exc.detail)), headers)


_UNDECODABLE = {RecursionError: "the JSON body is nested too deeply",
                UnicodeDecodeError: "the body is not valid UTF-8"}


def body_decode_error_handler(request: Request, exc: RecursionError | UnicodeDecodeError) -> Response[bytes]:
    """JSON nested thousands deep exhausts the decoder's recursion; a body declared in another
    charset is decoded by it and fails: the client's bytes, a 400. Raised anywhere else, these are
    ours (a 500)."""
    frames = traceback.extract_tb(exc.__traceback__)
    if any(frame.name in ("decode_json", "json") and "litestar" in frame.filename for frame in frames):
        _log_refusal(request, 400, "malformed_body")
        return _response(400, ErrorDetail(code="malformed_body", message=_UNDECODABLE[type(exc)]))
    return internal_error_handler(request, exc)


def internal_error_handler(request: Request, exc: Exception, status: int = 500) -> Response[bytes]:
    """Anything no other handler knows is our bug: logged once with its traceback, and answered in
    the one error shape without the details (they stay in the log)."""
    log.error("unhandled error", exc_info=exc,
              extra={"fields": {"method": request.method, "path": request.url.path, "status": status}})
    return _response(status, ErrorDetail(code="internal_error", message="internal error"))


EXCEPTION_HANDLERS = {
    Exception: internal_error_handler,
    RecursionError: body_decode_error_handler,
    UnicodeDecodeError: body_decode_error_handler,
    ApiError: api_error_handler,
    ValidationException: validation_error_handler,
    HTTPException: http_error_handler,
}
