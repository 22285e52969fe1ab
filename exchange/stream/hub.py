"""Delivers each account's private events to its open /v1/stream sockets in this process.

Events are rows of `account_events` (written by a trigger with the lease change itself, numbered per
account), so nothing is lost between a change and its delivery: on NOTIFY gpux_stream (payload: the
account id) the hub reads that account's events after the last seq each socket has seen, in order.
One LISTEN connection per process; several processes each serve their own sockets."""
from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from datetime import datetime, timezone
from functools import partial
from typing import Awaitable, Callable

import asyncpg

from exchange.core.listener import Listener, ListenOptions
from exchange.leases.service import lease_views_for
from exchange.feed.schemas import Envelope, encoder

log = logging.getLogger(__name__)
STREAM_CHANNEL = "gpux_stream"
Send = Callable[[bytes], Awaitable[None]]


class StreamClient:
    def __init__(self, account_id: int, send: Send, last_seq: int) -> None:
        self.account_id = account_id
        self.send = send
        self.last_seq = last_seq
        self.lock = asyncio.Lock()  # one delivery at a time per socket keeps events in order


class StreamHub:
    def __init__(self, pool: asyncpg.Pool, dsn: str, listen: ListenOptions | None = None) -> None:
        self.pool = pool
        self.dsn = dsn
        self.clients: dict[int, set[StreamClient]] = defaultdict(set)
        # Reconnects after a loss; then every socket gets its events after its last seq (`resync`).
        self.listener = Listener("stream", partial(asyncpg.connect, dsn), listen)
        self.listener.on_restored.append(self.resync)
        self.tasks: set[asyncio.Task] = set()
        # Others told of each account's new events (the webhook loop), on the same LISTEN.
        self.on_event: list[Callable[[int], None]] = []

    async def start(self) -> None:
        await self.listener.start()
        await self.listener.add(STREAM_CHANNEL, self._notified)

    async def stop(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await self.listener.stop()

    async def resync(self) -> None:
        """Notifications sent while the LISTEN was down never arrive, but the events are rows: deliver
        to every socket here whatever follows its last seq."""
        for clients in list(self.clients.values()):
            for client in list(clients):
                self._spawn(client)

    def _notified(self, _conn, _pid, _channel, payload: str) -> None:
        for hook in self.on_event:
            hook(int(payload))
        for client in list(self.clients.get(int(payload), ())):
            self._spawn(client)

    def _spawn(self, client: StreamClient) -> None:
        """Deliver in a task of its own (kept referenced until done)."""
        task = asyncio.get_running_loop().create_task(self.deliver(client))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def current_seq(self, account_id: int) -> int:
        return await self.pool.fetchval("SELECT event_seq FROM accounts WHERE id = $1", account_id)

    def attach(self, client: StreamClient) -> None:
        self.clients[client.account_id].add(client)

    def detach(self, client: StreamClient) -> None:
        self.clients[client.account_id].discard(client)

    async def deliver(self, client: StreamClient) -> None:
        """Send the account's events after the client's last seq, in order."""
        async with client.lock:
            rows = await self.pool.fetch(
                "SELECT seq, kind, market, lease_id, at FROM account_events WHERE account_id = $1 AND seq > $2"
                " ORDER BY seq LIMIT 1000", client.account_id, client.last_seq)
            # Each lease in the shape this account may see (an owner gets no tenant limit, hold or bid id).
            leases = await lease_views_for(self.pool, client.account_id, list({row["lease_id"] for row in rows}))
            for row in rows:
                await client.send(encoder.encode(Envelope(
                    channel="stream", type=row["kind"], market=row["market"], seq=row["seq"], ts=row["at"],
                    data=leases[row["lease_id"]])))
                client.last_seq = row["seq"]
            if len(rows) == 1000:  # more behind: go on, once this delivery has released the lock
                self._spawn(client)

    @staticmethod
    def control(kind: str, data: dict, seq: int | None = None) -> bytes:
        return encoder.encode(Envelope(channel="stream", type=kind, market=None, seq=seq,
                                             ts=datetime.now(timezone.utc), data=data))
