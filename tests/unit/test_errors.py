"""The one error shape for everything: an unhandled exception (our bug) answers 500 as
{"error": {"code": "internal_error", ...}} and is logged once with its traceback; refusals (4xx)
are logged without one, below error level. Exercised through a real ASGI app with the service's
exception handlers (no database needed: the handlers are all that is under test)."""
from __future__ import annotations

import logging

import pytest
from litestar import Litestar, get, post
from litestar.exceptions import NotFoundException
from litestar.logging import LoggingConfig
from litestar.params import JSONBody
from litestar.testing import TestClient

from exchange.core.errors import EXCEPTION_HANDLERS, InvalidField
from exchange.core.structs import Struct


@get("/boom")
async def boom() -> None:
    raise RuntimeError("a bug with a secret detail")


@get("/lookup")
async def lookup() -> None:
    raise KeyError("missing")


@get("/refused")
async def refused() -> None:
    raise InvalidField("limit_price", "must be greater than zero")


@get("/gone")
async def gone() -> None:
    raise NotFoundException("nothing here")


@pytest.fixture
def client():
    app = Litestar(route_handlers=[boom, lookup, refused, gone], exception_handlers=EXCEPTION_HANDLERS,
                   logging_config=LoggingConfig(log_exceptions="never"))
    with TestClient(app, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.mark.parametrize("path", ["/boom", "/lookup"])
def test_an_unhandled_error_is_a_500_in_the_error_shape_logged_with_its_traceback(client, caplog, path: str) -> None:
    with caplog.at_level(logging.DEBUG, logger="exchange"):
        response = client.get(path)
    assert response.status_code == 500
    assert response.json() == {"error": {"code": "internal_error", "message": "internal error"}}
    assert "secret" not in response.text
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is not None, caplog.records


@pytest.mark.parametrize(("path", "status", "field"), [("/refused", 422, "limit_price"), ("/gone", 404, None),
                                                       ("/no-such-route", 404, None)])
def test_a_refusal_is_logged_without_a_traceback_below_error_level(client, caplog, path, status, field) -> None:
    with caplog.at_level(logging.DEBUG):
        response = client.get(path)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] and error["message"] and error.get("field") == field
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.records


class Echo(Struct, frozen=True, kw_only=True):
    a: int


@post("/echo")
async def echo(data: JSONBody[Echo]) -> Echo:
    return data


async def test_a_client_that_hangs_up_mid_body_is_not_logged_as_our_error(caplog) -> None:
    """Litestar raises a 500 when the body stops early; the client is gone and it is not our bug:
    no error-level line, no traceback."""
    app = Litestar(route_handlers=[echo], exception_handlers=EXCEPTION_HANDLERS,
                   logging_config=LoggingConfig(log_exceptions="never"))
    messages = iter([{"type": "http.request", "body": b'{"a": ', "more_body": True}, {"type": "http.disconnect"}])
    sent: list[dict] = []

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/echo", "raw_path": b"/echo", "root_path": "", "query_string": b"",
             "headers": [(b"content-type", b"application/json"), (b"content-length", b"100")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2), "state": {}}
    with caplog.at_level(logging.DEBUG):
        await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 400
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info], caplog.records
