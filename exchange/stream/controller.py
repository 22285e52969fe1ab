"""WS /v1/stream: an account's private events (fills, lease starts, reclaim or outbid notices, lease
ends) as envelopes whose `seq` rises by one per account. The key comes in the Authorization header
or in a first message {"op":"auth","key":…,"since":n?}; `since` replays what came after seq n."""
from __future__ import annotations

import asyncio
import contextlib

from litestar import WebSocket, websocket
from litestar.exceptions import TooManyRequestsException, WebSocketDisconnect

from exchange.core.auth import parse_authorization
from exchange.core.limits import (SharedConnectionLimits, authenticate_limited, client_address, connection_limits,
                                  limiter_of)
from exchange.stream.hub import StreamClient, StreamHub
from exchange.stream.schemas import op_decoder

HEARTBEAT_S = 15.0
UNAUTHORISED = 4401  # an application close code: no or bad key
POLICY_VIOLATION = 1008  # over a connection or authentication limit
POLICY_VIOLATION = 1008  # over a connection or authentication limit


async def _authenticate(socket: WebSocket) -> tuple[int | None, int | None]:
    """(account id, since) from the header, else from the first message (within 10 s). The key is
    resolved like HTTP's (the process's principal cache, unknown keys charged to the address's
    failed-auth budget); TooManyRequestsException when that budget is spent."""
    header = socket.headers.get("authorization")
    since = None
    token: str | None = None
    if header is None:
        with contextlib.suppress(asyncio.TimeoutError, WebSocketDisconnect, Exception):
            async with asyncio.timeout(10):
                op = op_decoder.decode(await socket.receive_data(mode="text"))
                token, since = (op.key or "").strip(), op.since
    else:
        token = parse_authorization(header)
    ctx = socket.app.state.ctx
    address = client_address(socket.scope)
    if not token:
        decision = await limiter_of(ctx).take(f"auth:{address}", ctx.settings.auth_failures_per_s)
        if not decision.allowed:
            raise TooManyRequestsException("too many authentication failures from this address")
        return None, None
    principal = await authenticate_limited(ctx, token, address)
    if principal is None or principal.role not in ("tenant", "owner", "admin", "trader"):
        return None, None
    return principal.account_id, since


async def _refuse(socket: WebSocket, hub: StreamHub, code: str, message: str, close_code: int) -> None:
    with contextlib.suppress(Exception):
        await socket.send_bytes(hub.control("error", {"code": code, "message": message}))
        await socket.close(code=close_code, reason=message[:120])


async def _acquire_or_refuse(socket: WebSocket, hub: StreamHub, connections: SharedConnectionLimits, key: str,
                             limit: int, what: str):
    """A place among `key`'s open sockets, or None after telling the client it is over the limit."""
    slot = await connections.acquire(key, limit)
    if slot is None:
        await _refuse(socket, hub, "too_many_connections", f"at most {limit} {what}", POLICY_VIOLATION)
    return slot


@websocket("/v1/stream", name="stream")
async def stream_socket(socket: WebSocket) -> None:
    hub: StreamHub = socket.app.state.stream_hub
    ctx = socket.app.state.ctx
    connections = connection_limits(ctx)
    await socket.accept()
    slot = await _acquire_or_refuse(socket, hub, connections, f"addr:{client_address(socket.scope)}",
                                    ctx.settings.ws_per_address, "open websockets per client address")
    if slot is None:
        return
    try:
        await _serve(socket, hub, ctx, connections)
    finally:
        await connections.release(slot)


async def _serve(socket: WebSocket, hub: StreamHub, ctx, connections: SharedConnectionLimits) -> None:
    try:
        account_id, since = await _authenticate(socket)
    except TooManyRequestsException as exc:
        await _refuse(socket, hub, "rate_limited", str(exc.detail), POLICY_VIOLATION)
        return
    if account_id is None:
        await socket.send_bytes(hub.control("error", {"code": "unauthorized",
                                                       "message": "send the API key: Authorization header or "
                                                                  '{"op":"auth","key":…}'}))
        await socket.close(code=UNAUTHORISED, reason="unauthorized")
        return
    slot = await _acquire_or_refuse(socket, hub, connections, f"acct:{account_id}", ctx.settings.ws_per_account,
                                    "open streams per account")
    if slot is None:
        return
    try:
        await _stream(socket, hub, account_id, since)
    finally:
        await connections.release(slot)


async def _stream(socket: WebSocket, hub: StreamHub, account_id: int, since: int | None) -> None:
    current = await hub.current_seq(account_id)
    start = current if since is None else max(0, min(since, current))

    async def send(payload: bytes) -> None:
        await socket.send_bytes(payload)

    client = StreamClient(account_id, send, start)
    hub.attach(client)
    try:
        await socket.send_bytes(hub.control("ready", {"account_id": account_id, "seq": current}, seq=current))
        await hub.deliver(client)  # the replay, if `since` asked for one
        while True:
            try:
                async with asyncio.timeout(HEARTBEAT_S):
                    message = await socket.receive()
            except asyncio.TimeoutError:
                await socket.send_bytes(hub.control("heartbeat", {"seq": client.last_seq}, seq=client.last_seq))
                continue
            if message["type"] == "websocket.disconnect":
                break
    except WebSocketDisconnect:
        pass
    finally:
        hub.detach(client)
