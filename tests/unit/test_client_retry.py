"""The client's opt-in retry on answers that mean "not now" (retry_statuses), against a real HTTP
server on 127.0.0.1 that answers from a script: which calls are resent, how often, and when a
Retry-After stops the client from resending on its own."""
from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest

from exchange.client import AsyncClient, ConnectionFailed, RateLimited, ServerError
from exchange.hosts.schemas import AgentIdentity

IDENTITY = {"host_id": 1, "name": "h1", "fabric": "default"}
# Literal rather than aio.TRANSIENT_STATUSES, so that this file also runs against a client without it.
TRANSIENT_STATUSES = frozenset({429, 502, 503, 504})
UNAVAILABLE = (503, {}, {"error": {"code": "unavailable", "message": "try again"}})


class ScriptedServer:
    """Answers each request with the next scripted (status, headers, body); the last one repeats."""

    def __init__(self, *answers: tuple[int, dict[str, str], Any]) -> None:
        self.answers = list(answers)
        self.requests: list[str] = []  # "METHOD path" of every request received
        self.port = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ScriptedServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while request_line := await reader.readline():
                method, target, _ = request_line.decode().split(" ", 2)
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, value = line.decode().split(":", 1)
                    if name.strip().lower() == "content-length":
                        length = int(value)
                await reader.readexactly(length)
                self.requests.append(f"{method} {target}")
                status, headers, body = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
                data = json.dumps(body).encode()
                extra = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}"
                             f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def client(url: str, **options: Any) -> AsyncClient:
    return AsyncClient(url, "token", backoff_s=0.001, **options)


async def test_a_read_answered_503_then_200_is_resent_and_succeeds() -> None:
    async with ScriptedServer(UNAVAILABLE, UNAVAILABLE, (200, {}, IDENTITY)) as server:
        async with client(server.url, retry_statuses=TRANSIENT_STATUSES) as api:
            identity = await api.agent_me()

    assert identity == AgentIdentity(host_id=1, name="h1", fabric="default")
    assert server.requests == ["GET /v1/agent/me"] * 3


async def test_without_retry_statuses_a_503_is_raised_at_once() -> None:
    async with ScriptedServer(UNAVAILABLE, (200, {}, IDENTITY)) as server:
        async with client(server.url) as api:
            with pytest.raises(ServerError) as refused:
                await api.agent_me()

    assert refused.value.status == 503 and refused.value.code == "unavailable"
    assert server.requests == ["GET /v1/agent/me"]


async def test_a_call_not_safe_to_repeat_is_not_resent_after_a_503() -> None:
    """An offer has no idempotency key; a 502/504 from a proxy may come after the server acted."""
    async with ScriptedServer((502, {}, {"error": {"code": "bad_gateway", "message": "upstream"}})) as server:
        async with client(server.url, retry_statuses=TRANSIENT_STATUSES) as api:
            with pytest.raises(ServerError):
                await api.create_offer(1, 1, "1.00", available_until=datetime(2026, 1, 2, tzinfo=UTC))
            with pytest.raises(ServerError):
                await api.withdraw_offer(3)  # a DELETE is not repeatable either

    assert server.requests == ["POST /v1/offers/", "DELETE /v1/offers/3"]


async def test_retries_are_bounded_and_the_last_answer_is_raised() -> None:
    async with ScriptedServer(UNAVAILABLE) as server:
        async with client(server.url, retry_statuses=TRANSIENT_STATUSES, retries=2) as api:
            with pytest.raises(ServerError):
                await api.agent_me()

    assert len(server.requests) == 3


async def test_a_retry_after_within_the_cap_is_waited_out_and_one_beyond_it_is_raised() -> None:
    """Retry-After 0 is honoured and resent; an hour is more than the client waits on its own:
    the caller gets RateLimited with the server's figure, after one request."""
    ok_later = (429, {"Retry-After": "0"}, {"error": {"code": "rate_limited", "message": "slow down"}})
    async with ScriptedServer(ok_later, (200, {}, IDENTITY)) as server:
        async with client(server.url, retry_statuses=TRANSIENT_STATUSES) as api:
            assert (await api.agent_me()).host_id == 1
    assert len(server.requests) == 2

    hour = (429, {"Retry-After": "3600"}, {"error": {"code": "rate_limited", "message": "slow down"}})
    async with ScriptedServer(hour, (200, {}, IDENTITY)) as server:
        async with client(server.url, retry_statuses=TRANSIENT_STATUSES, retry_after_max_s=10.0) as api:
            with pytest.raises(RateLimited) as limited:
                await api.agent_me()
    assert limited.value.retry_after_s == 3600.0
    assert server.requests == ["GET /v1/agent/me"]


async def test_a_status_not_opted_in_is_not_resent() -> None:
    async with ScriptedServer((500, {}, {"error": {"code": "internal", "message": "bug"}}),
                              (200, {}, IDENTITY)) as server:
        async with client(server.url, retry_statuses=TRANSIENT_STATUSES) as api:
            with pytest.raises(ServerError):
                await api.agent_me()

    assert server.requests == ["GET /v1/agent/me"]


@pytest.mark.parametrize("failure", [httpx.PoolTimeout, httpx.WriteTimeout, httpx.UnsupportedProtocol,
                                     httpx.LocalProtocolError])
async def test_every_transport_failure_is_connection_failed(failure: type[httpx.TransportError]) -> None:
    """A caller (the host agent: "try later") handles ConnectionFailed; an HTTP library exception
    escaping instead would end the agent's task."""
    def fail(request: httpx.Request) -> httpx.Response:
        raise failure("simulated", request=request)

    async with AsyncClient("http://exchange.invalid", "token", backoff_s=0.001,
                           transport=httpx.MockTransport(fail)) as api:
        with pytest.raises(ConnectionFailed, match=failure.__name__):
            await api.agent_me()
