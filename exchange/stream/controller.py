"""WS /v1/stream: an account's private events (fills, lease starts, reclaim or outbid notices, lease
ends) as envelopes whose `seq` rises by one per account. The key comes in the Authorization header
or in a first message {"op":"auth","key":…,"since":n?}; `since` replays what came after seq n."""
from __future__ import annotations

import asyncio
import contextlib

from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect

from exchange.core.auth import resolve_token
from exchange.stream.hub import StreamClient, StreamHub
from exchange.stream.schemas import op_decoder

HEARTBEAT_S = 15.0
UNAUTHORISED = 4401  # an application close code: no or bad key


async def _authenticate(socket: WebSocket) -> tuple[int | None, int | None]:
    """(account id, since) from the header, else from the first message (within 10 s)."""
    header = socket.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    since = None
    if not token:
        with contextlib.suppress(asyncio.TimeoutError, WebSocketDisconnect, Exception):
            async with asyncio.timeout(10):
                op = op_decoder.decode(await socket.receive_data(mode="text"))
                token, since = (op.key or ""), op.since
    elif scheme.lower() != "bearer":
        token = ""
    principal = await resolve_token(socket.app.state.ctx.pool, token.strip()) if token else None
    if principal is None or principal.role not in ("tenant", "owner", "admin", "trader"):
        return None, None
    return principal.account_id, since


@websocket("/v1/stream", name="stream")
async def stream_socket(socket: WebSocket) -> None:
    hub: StreamHub = socket.app.state.stream_hub
    await socket.accept()
    account_id, since = await _authenticate(socket)
    if account_id is None:
        await socket.send_bytes(hub.control("error", {"code": "unauthorized",
                                                       "message": "send the API key: Authorization header or "
                                                                  '{"op":"auth","key":…}'}))
        await socket.close(code=UNAUTHORISED, reason="unauthorized")
        return
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
