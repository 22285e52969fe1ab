"""The delivery loop: each webhook gets its account's events (rows of account_events, after its stored
cursor) in order, one message at a time, at least once.

Per pass, every webhook with work is taken with SELECT ... FOR UPDATE SKIP LOCKED inside a transaction
that lasts through its HTTP attempt: several server processes each run this loop, and a webhook is
worked by one of them at a time (in order), the others skip it. A message is queued (a
webhook_deliveries row holding its body) in the same transaction that moves the cursor past its event,
and marked delivered in the transaction of the attempt that got a 2xx: a crash between the POST and
the commit sends it again (at least once, never lost). A failed attempt sets next_attempt_at by
exponential backoff (GPUX_WEBHOOK_RETRY_MIN_S doubling up to GPUX_WEBHOOK_RETRY_MAX_S), retried for as
long as the webhook exists; later messages wait behind it, so the order holds.

Signature (as Stripe's): header `Gpux-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret,
"<t>.<body>")>`; a receiver checks it and refuses a t too far from its clock (replays)."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
import asyncpg
import httpx

from exchange.core.context import AppContext
from exchange.feed.schemas import Envelope, encoder
from exchange.leases.service import lease_views_for

log = logging.getLogger(__name__)
SIGNATURE_HEADER = "Gpux-Signature"
# Messages one webhook sends in one pass before the others get their turn.
BATCH = 100
# Webhooks one process works at the same time (each holds a pool connection during its attempt).
CONCURRENCY = 4
MAX_ERROR_CHARS = 500


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def backoff_s(attempts: int, min_s: float, max_s: float) -> float:
    """The wait after the `attempts`-th failure: min_s, 2*min_s, 4*min_s, ... up to max_s."""
    return min(max_s, min_s * 2 ** min(attempts - 1, 60))


class WebhookDeliverer:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.client = httpx.AsyncClient(timeout=self.settings.webhook_timeout_s, follow_redirects=False)

    def wake(self, *_args) -> None:
        self.wakeup.set()

    async def resync(self) -> None:
        self.wake()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            try:
                await self.task
            except (asyncio.CancelledError, Exception):
                pass
        await self.client.aclose()

    async def _run(self) -> None:
        while True:
            self.wakeup.clear()
            try:
                await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a database blip: try again next pass, never end the loop
                log.exception("webhook delivery pass failed")
            try:
                await asyncio.wait_for(self.wakeup.wait(), self.settings.webhook_poll_s)
            except asyncio.TimeoutError:
                pass

    async def run_once(self) -> None:
        """One pass: every webhook that has an event after its cursor or a message due."""
        ids = await self.ctx.pool.fetch(
            "SELECT w.id FROM webhooks w JOIN accounts a ON a.id = w.account_id"
            " WHERE a.event_seq > w.cursor_seq OR EXISTS (SELECT 1 FROM webhook_deliveries d"
            "   WHERE d.webhook_id = w.id AND d.delivered_at IS NULL AND d.next_attempt_at <= now())"
            " ORDER BY w.id")
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def one(webhook_id: int) -> None:
            async with semaphore:
                try:
                    await self.work(webhook_id)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("webhook %s delivery failed", webhook_id)

        await asyncio.gather(*(one(row["id"]) for row in ids))

    async def work(self, webhook_id: int) -> None:
        for _ in range(BATCH):
            async with self.ctx.pool.acquire() as conn, conn.transaction():
                hook = await conn.fetchrow(
                    "SELECT id, account_id, url, events, secret, cursor_seq FROM webhooks WHERE id = $1"
                    " FOR UPDATE SKIP LOCKED", webhook_id)
                if hook is None:  # deleted, or another process works it now
                    return
                pending = await conn.fetchrow(
                    "SELECT id, body, attempts, next_attempt_at <= now() AS due FROM webhook_deliveries"
                    " WHERE webhook_id = $1 AND delivered_at IS NULL ORDER BY id LIMIT 1", webhook_id)
                if pending is None:
                    pending = await self._queue_next(conn, hook)
                    if pending is None:
                        return
                if not pending["due"]:
                    return  # backing off; the next message waits behind it
                if not await self._attempt(conn, hook, pending):
                    return

    async def _queue_next(self, conn: asyncpg.Connection, hook: asyncpg.Record) -> asyncpg.Record | None:
        """Queue the next subscribed event after the cursor and move the cursor to it; with none, move
        the cursor to the account's head. One statement, one snapshot: an event committed after it has a
        higher seq than that head (seqs are given under the account's row lock), so none is skipped."""
        row = await conn.fetchrow(
            "SELECT (SELECT event_seq FROM accounts WHERE id = $1) AS head, e.seq, e.kind, e.market, e.lease_id, e.at"
            " FROM (SELECT 1) one LEFT JOIN LATERAL (SELECT seq, kind, market, lease_id, at FROM account_events"
            "   WHERE account_id = $1 AND seq > $2 AND kind = ANY($3::text[]) ORDER BY seq LIMIT 1) e ON true",
            hook["account_id"], hook["cursor_seq"], hook["events"])
        if row["seq"] is None:
            if row["head"] > hook["cursor_seq"]:
                await conn.execute("UPDATE webhooks SET cursor_seq = $2 WHERE id = $1", hook["id"], row["head"])
            return None
        # The same message as /v1/stream's for this event (the lease as this account may see it, as
        # it stands when queued; every retry sends these bytes).
        leases = await lease_views_for(conn, hook["account_id"], [row["lease_id"]])
        body = encoder.encode(Envelope(channel="stream", type=row["kind"], market=row["market"], seq=row["seq"],
                                       ts=row["at"], data=leases[row["lease_id"]]))
        await conn.execute("UPDATE webhooks SET cursor_seq = $2 WHERE id = $1", hook["id"], row["seq"])
        return await conn.fetchrow(
            "INSERT INTO webhook_deliveries (webhook_id, seq, kind, body, created_at, next_attempt_at)"
            " VALUES ($1, $2, $3, $4, $5, $5) RETURNING id, body, attempts, true AS due",
            hook["id"], row["seq"], row["kind"], body, self.ctx.clock())

    async def _attempt(self, conn: asyncpg.Connection, hook: asyncpg.Record, pending: asyncpg.Record) -> bool:
        body: bytes = pending["body"]
        headers = {"Content-Type": "application/json", "User-Agent": "gpux-webhooks/1",
                   SIGNATURE_HEADER: sign(hook["secret"], int(time.time()), body)}
        status: int | None = None
        error: str | None = None
        try:
            # Streamed and never read: only the status counts, and a receiver's large answer costs nothing.
            async with self.client.stream("POST", hook["url"], content=body, headers=headers) as response:
                status = response.status_code
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except httpx.HTTPError as exc:
            error = (f"{type(exc).__name__}: {exc}" or type(exc).__name__)[:MAX_ERROR_CHARS]
        attempts = pending["attempts"] + 1
        # clock_timestamp(), not now(): the transaction began before the attempt.
        if error is None:
            await conn.execute(
                "UPDATE webhook_deliveries SET attempts = $2, last_status_code = $3, last_error = NULL,"
                " delivered_at = clock_timestamp(), next_attempt_at = NULL WHERE id = $1", pending["id"], attempts, status)
            return True
        wait_s = backoff_s(attempts, self.settings.webhook_retry_min_s, self.settings.webhook_retry_max_s)
        await conn.execute(
            "UPDATE webhook_deliveries SET attempts = $2, last_status_code = $3, last_error = $4,"
            " next_attempt_at = clock_timestamp() + make_interval(secs => $5) WHERE id = $1",
            pending["id"], attempts, status, error, wait_s)
        return False
