"""WS /v1/feed: public, no key. Ops in, envelopes out (SPEC §9)."""
from __future__ import annotations

import asyncio
import contextlib

from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect

from exchange.core.limits import client_address, connection_limits
from exchange.feed.hub import SLOW_CONSUMER, FeedHub, Subscriber

TOO_MANY_CONNECTIONS = 1008  # policy violation


async def _read_ops(hub: FeedHub, client: Subscriber, socket: WebSocket) -> None:
    try:
        while not client.done.is_set():
            message = await socket.receive()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("text")
            if raw is None:
                raw = message.get("bytes")
            if raw is not None:
                await hub.handle(client, raw)
    except WebSocketDisconnect:
        pass
    finally:
        client.finish()


@websocket("/v1/feed", name="feed")
async def feed_socket(socket: WebSocket) -> None:
    """Subscribe with {"op":"subscribe","channels":[...],"markets":[...]}: a snapshot per market and
    channel, then updates whose `seq` rises by one; heartbeats when idle."""
    hub: FeedHub = socket.app.state.feed_hub
    ctx = socket.app.state.ctx
    connections = connection_limits(ctx)
    await socket.accept()
    slot = await connections.acquire(f"addr:{client_address(socket.scope)}", ctx.settings.ws_per_address)
    if slot is None:
        message = f"at most {ctx.settings.ws_per_address} open websockets per client address"
        with contextlib.suppress(Exception):
            await socket.send(hub.error_event("too_many_connections", message))
            await socket.close(code=TOO_MANY_CONNECTIONS, reason=message[:120])
        return
    try:
        await _serve(hub, socket)
    finally:
        await connections.release(slot)


async def _serve(hub: FeedHub, socket: WebSocket) -> None:
    client = hub.connect(socket.send)
    reader = asyncio.create_task(_read_ops(hub, client, socket))
    try:
        await client.done.wait()
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
        await hub.disconnect(client)
    if client.kill_reason is not None:
        # Best effort: the reason as an error envelope and in the close frame; a socket that takes
        # nothing more is left to the server, which drops it.
        goodbye = hub.error_event("slow_consumer", client.kill_reason)
        with contextlib.suppress(asyncio.TimeoutError, Exception):
            async with asyncio.timeout(hub.settings.close_timeout_s):
                await socket.send(goodbye)
                await socket.close(code=SLOW_CONSUMER, reason=client.kill_reason[:120])
    elif socket.connection_state != "disconnect":
        with contextlib.suppress(Exception):
            await socket.close()

