"""The delivery loop: each webhook gets its account's events (rows of account_events, after its stored
cursor) in order, one message at a time, at least once, and one account's slow or dead receivers
delay only that account's messages.

An attempt is three steps, none holding a pool connection while a receiver takes its time:
1. *claim* (short transaction): lock the webhook row (SKIP LOCKED), queue the next message if none is
   pending (a webhook_deliveries row holding its body, in the transaction that moves the cursor past
   its event), and mark the webhook claimed by this attempt (a random token and an expiry);
2. *send* (exchange/webhooks/sender.py): no database;
3. *record* (short transaction): the outcome is written, and the claim freed, only if the token is
   still this attempt's. A process that dies after sending leaves a claim that expires (the attempt
   timeout plus a margin), and the message is sent again: at least once, never lost. Only the claim's
   holder sends, so a webhook's messages go in order.

Each process runs this loop. A pass lists the webhooks with work that nobody holds and starts a
worker for each, taking accounts in turn (the first webhook of every account, then the second, ...,
starting from a different account each pass) within a cap of attempts in flight per process
(GPUX_WEBHOOK_CONCURRENCY) and per account (GPUX_WEBHOOK_ACCOUNT_CONCURRENCY). A failed attempt sets
next_attempt_at by exponential backoff (GPUX_WEBHOOK_RETRY_MIN_S doubling up to
GPUX_WEBHOOK_RETRY_MAX_S); later messages wait behind it, so the order holds. A webhook with no
success for GPUX_WEBHOOK_DISABLE_AFTER_S is disabled: not worked, its events kept for when its
account re-enables it."""
from __future__ import annotations

import asyncio
import logging
import secrets
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Iterable

import asyncpg

from exchange.core.context import AppContext
from exchange.feed.schemas import Envelope, encoder
from exchange.leases.service import lease_views_for
from exchange.webhooks.resolvers import Destinations
from exchange.webhooks.sender import Outcome, Sender
from exchange.webhooks.signing import signed_headers

log = logging.getLogger(__name__)
# Messages one worker sends for its webhook before it gives the slot back.
BATCH = 100
# How long a claim outlives its attempt's timeout before another process may take the webhook over.
CLAIM_MARGIN_S = 30.0


def backoff_s(attempts: int, min_s: float, max_s: float) -> float:
    """The wait after the `attempts`-th failure: min_s, 2*min_s, 4*min_s, ... up to max_s."""
    return min(max_s, min_s * 2 ** min(attempts - 1, 60))


def fair_order(rows: Iterable[tuple[int, int]], turn: int) -> list[tuple[int, int]]:
    """(webhook id, account id) pairs in the order to start them: the accounts in turn, one webhook of
    each per round, the first account rotating with `turn` so none is always served first."""
    by_account: dict[int, list[int]] = {}
    for webhook_id, account_id in rows:
        by_account.setdefault(account_id, []).append(webhook_id)
    accounts = sorted(by_account)
    if accounts:
        start = turn % len(accounts)
        accounts = accounts[start:] + accounts[:start]
    order: list[tuple[int, int]] = []
    for round_ in range(max((len(hooks) for hooks in by_account.values()), default=0)):
        order.extend((by_account[a][round_], a) for a in accounts if round_ < len(by_account[a]))
    return order


@dataclass(frozen=True, slots=True)
class Job:
    """A claimed message: what to send, and the claim that lets its outcome be recorded."""
    webhook_id: int
    url: str
    secret: str
    delivery_id: int
    body: bytes
    attempts: int
    token: int


class WebhookDeliverer:
    def __init__(self, ctx: AppContext, destinations: Destinations) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.sender = Sender(destinations, self.settings.webhook_timeout_s, self.settings.webhook_concurrency)
        self.wakeup = asyncio.Event()
        self.task: asyncio.Task | None = None
        self.workers: dict[int, asyncio.Task] = {}  # webhook id -> its worker in this process
        self.in_flight: Counter[int] = Counter()  # account id -> its workers in this process
        self.turn = 0

    def wake(self, *_args) -> None:
        self.wakeup.set()

    async def resync(self) -> None:
        self.wake()

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        tasks = [task for task in (self.task, *self.workers.values()) if task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.sender.aclose()

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
        """One pass: start a worker for each webhook with work (an event after its cursor or a message
        due) that no process holds, fairly across accounts and within the caps."""
        # Work is a pending message that is due, or, with none pending, an event after the cursor. A
        # message backing off holds back the events behind it: listing those would start a worker
        # that finds nothing to do, and its end would start the next pass at once (a busy loop).
        rows = await self.ctx.pool.fetch(
            "SELECT w.id, w.account_id FROM webhooks w JOIN accounts a ON a.id = w.account_id"
            " LEFT JOIN LATERAL (SELECT d.next_attempt_at FROM webhook_deliveries d"
            "   WHERE d.webhook_id = w.id AND d.delivered_at IS NULL ORDER BY d.id LIMIT 1) p ON true"
            " WHERE w.disabled_at IS NULL AND (w.claim_until IS NULL OR w.claim_until <= $1)"
            "   AND (p.next_attempt_at <= $1 OR (p.next_attempt_at IS NULL AND a.event_seq > w.cursor_seq))"
            " ORDER BY w.id", self.ctx.clock())
        self.turn += 1
        for webhook_id, account_id in fair_order(((r["id"], r["account_id"]) for r in rows), self.turn):
            if len(self.workers) >= self.settings.webhook_concurrency:
                break
            if webhook_id in self.workers or self.in_flight[account_id] >= self.settings.webhook_account_concurrency:
                continue
            self.in_flight[account_id] += 1
            self.workers[webhook_id] = asyncio.get_running_loop().create_task(self._work(webhook_id, account_id))

    async def drain(self) -> None:
        """Passes until no webhook has work due now (tests, on a manual clock)."""
        while True:
            await self.run_once()
            if not self.workers:
                return
            await asyncio.gather(*self.workers.values(), return_exceptions=True)

    async def _work(self, webhook_id: int, account_id: int) -> None:
        failed = False
        try:
            for _ in range(BATCH):
                job = await self._claim(webhook_id)
                if job is None:
                    return
                headers = signed_headers(job.secret, job.delivery_id, int(self.ctx.clock().timestamp()), job.body)
                outcome = await self.sender.send(job.url, job.body, headers)
                if not await self._record(job, outcome) or outcome.error is not None:
                    return
        except asyncio.CancelledError:
            raise
        except Exception:
            failed = True
            log.exception("webhook %s delivery failed", webhook_id)
        finally:
            self.workers.pop(webhook_id, None)
            self.in_flight[account_id] -= 1
            if self.in_flight[account_id] <= 0:
                del self.in_flight[account_id]
            # A slot is free: the next pass may start what waited for it. Not after an error (a
            # database blip): the poll paces the retry instead of a pass at once.
            if not failed:
                self.wake()

    async def _claim(self, webhook_id: int) -> Job | None:
        now = self.ctx.clock()
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            hook = await conn.fetchrow(
                "SELECT id, account_id, url, events, secret, cursor_seq FROM webhooks WHERE id = $1"
                " AND disabled_at IS NULL AND (claim_until IS NULL OR claim_until <= $2) FOR UPDATE SKIP LOCKED",
                webhook_id, now)
            if hook is None:  # deleted, disabled, or another process holds it
                return None
            pending = await conn.fetchrow(
                "SELECT id, body, attempts, next_attempt_at <= $2 AS due FROM webhook_deliveries"
                " WHERE webhook_id = $1 AND delivered_at IS NULL ORDER BY id LIMIT 1", webhook_id, now)
            if pending is None:
                pending = await self._queue_next(conn, hook, now)
                if pending is None:
                    return None
            if not pending["due"]:
                return None  # backing off; the next message waits behind it
            token = secrets.randbits(63)
            claim_until = now + timedelta(seconds=self.settings.webhook_timeout_s + CLAIM_MARGIN_S)
            await conn.execute("UPDATE webhooks SET claim_token = $2, claim_until = $3 WHERE id = $1",
                               webhook_id, token, claim_until)
        return Job(webhook_id=webhook_id, url=hook["url"], secret=hook["secret"], delivery_id=pending["id"],
                   body=pending["body"], attempts=pending["attempts"], token=token)

    async def _queue_next(self, conn: asyncpg.Connection, hook: asyncpg.Record,
                          now: datetime) -> asyncpg.Record | None:
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
            hook["id"], row["seq"], row["kind"], body, now)

    async def _record(self, job: Job, outcome: Outcome) -> bool:
        """Write the attempt's outcome and free the claim; False when the claim is no longer ours (the
        webhook was deleted, or the claim ran out and another process sends the message again)."""
        now = self.ctx.clock()
        attempts = job.attempts + 1
        async with self.ctx.pool.acquire() as conn, conn.transaction():
            hook = await conn.fetchrow("SELECT failing_since FROM webhooks WHERE id = $1 AND claim_token = $2"
                                       " FOR UPDATE", job.webhook_id, job.token)
            if hook is None:
                return False
            if outcome.error is None:
                await conn.execute(
                    "UPDATE webhook_deliveries SET attempts = $2, last_status_code = $3, last_error = NULL,"
                    " delivered_at = $4, next_attempt_at = NULL WHERE id = $1",
                    job.delivery_id, attempts, outcome.status, now)
                await conn.execute("UPDATE webhooks SET claim_token = NULL, claim_until = NULL, failing_since = NULL"
                                   " WHERE id = $1", job.webhook_id)
                return True
            wait_s = backoff_s(attempts, self.settings.webhook_retry_min_s, self.settings.webhook_retry_max_s)
            await conn.execute(
                "UPDATE webhook_deliveries SET attempts = $2, last_status_code = $3, last_error = $4,"
                " next_attempt_at = $5 WHERE id = $1",
                job.delivery_id, attempts, outcome.status, outcome.error, now + timedelta(seconds=wait_s))
            failing_since = hook["failing_since"] or now
            disable = (now - failing_since).total_seconds() >= self.settings.webhook_disable_after_s
            await conn.execute(
                "UPDATE webhooks SET claim_token = NULL, claim_until = NULL, failing_since = $2,"
                " disabled_at = $3 WHERE id = $1", job.webhook_id, failing_since, now if disable else None)
            if disable:
                log.warning("webhook %s disabled: no delivery succeeded since %s", job.webhook_id,
                            failing_since.isoformat())
        return True
