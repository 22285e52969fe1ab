"""Webhooks: register, list, delete, the delivery log and a test ping. An account sees only its own:
another's webhook answers 404, as if it did not exist."""
from __future__ import annotations

import secrets

import asyncpg

from exchange.core.auth import Principal
from exchange.core.context import AppContext
from exchange.core.errors import ApiError, InvalidField, NotFound
from exchange.feed.schemas import Envelope, encoder
from exchange.webhooks.destinations import Refused
from exchange.webhooks.resolvers import Busy, Destinations
from exchange.webhooks.schemas import EVENT_KINDS, Delivery, Webhook, WebhookCreate

# Each registered URL is a delivery loop's work; a bound keeps one account from making it unbounded.
MAX_WEBHOOKS_PER_ACCOUNT = 16
# The delivery log lists the newest this many.
DELIVERY_LOG_LIMIT = 100


_WEBHOOK_COLUMNS = "id, url, events, created_at, failing_since, disabled_at"


def _webhook(row: asyncpg.Record, secret: str | None = None) -> Webhook:
    return Webhook(id=row["id"], url=row["url"], events=list(row["events"]), created_at=row["created_at"],
                   status="disabled" if row["disabled_at"] else "active", failing_since=row["failing_since"],
                   disabled_at=row["disabled_at"], secret=secret)


def _wake(ctx: AppContext) -> None:
    wake = ctx.extras.get("webhook_wake")
    if wake is not None:
        wake()


async def create_webhook(ctx: AppContext, principal: Principal, data: WebhookCreate) -> Webhook:
    destinations: Destinations = ctx.extras["webhook_destinations"]
    try:
        # Checked again at every attempt: a name may point elsewhere later.
        await destinations.check(data.url, principal.account_id)
    except Refused as refused:
        raise InvalidField("url", str(refused)) from None
    except Busy as busy:
        raise ApiError("rate_limited", str(busy), status=429, headers={"Retry-After": "1"}) from None
    # Kept in the canonical order, once each.
    events = [kind for kind in EVENT_KINDS if kind in data.events]
    secret = "whsec_" + secrets.token_hex(32)
    async with ctx.pool.acquire() as conn, conn.transaction():
        # The account row lock counts webhooks without a race between two creates.
        head = await conn.fetchval("SELECT event_seq FROM accounts WHERE id = $1 FOR UPDATE", principal.account_id)
        count = await conn.fetchval("SELECT count(*) FROM webhooks WHERE account_id = $1", principal.account_id)
        if count >= MAX_WEBHOOKS_PER_ACCOUNT:
            raise ApiError("too_many_webhooks", f"an account may register at most {MAX_WEBHOOKS_PER_ACCOUNT} webhooks",
                           status=409)
        # Events from now on: the cursor starts at the account's current seq.
        row = await conn.fetchrow(
            "INSERT INTO webhooks (account_id, url, events, secret, cursor_seq, created_at)"
            f" VALUES ($1, $2, $3, $4, $5, $6) RETURNING {_WEBHOOK_COLUMNS}",
            principal.account_id, data.url, events, secret, head, ctx.clock())
    return _webhook(row, secret)


async def list_webhooks(ctx: AppContext, principal: Principal) -> list[Webhook]:
    rows = await ctx.pool.fetch(f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE account_id = $1 ORDER BY id",
                                principal.account_id)
    return [_webhook(row) for row in rows]


async def _own(conn, principal: Principal, webhook_id: int) -> asyncpg.Record:
    row = await conn.fetchrow(f"SELECT {_WEBHOOK_COLUMNS} FROM webhooks WHERE id = $1 AND account_id = $2",
                              webhook_id, principal.account_id)
    if row is None:
        raise NotFound("webhook")
    return row


async def delete_webhook(ctx: AppContext, principal: Principal, webhook_id: int) -> Webhook:
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await _own(conn, principal, webhook_id)
        await conn.execute("DELETE FROM webhooks WHERE id = $1", webhook_id)  # its deliveries go with it
    return _webhook(row)


async def enable_webhook(ctx: AppContext, principal: Principal, webhook_id: int) -> Webhook:
    """A disabled webhook works again from where it stopped: its pending message is due now. Harmless
    on an active one."""
    now = ctx.clock()
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await _own(conn, principal, webhook_id)
        if row["disabled_at"] is not None:
            row = await conn.fetchrow("UPDATE webhooks SET disabled_at = NULL, failing_since = NULL WHERE id = $1"
                                      f" RETURNING {_WEBHOOK_COLUMNS}", webhook_id)
            await conn.execute("UPDATE webhook_deliveries SET next_attempt_at = $2 WHERE webhook_id = $1"
                               " AND delivered_at IS NULL AND next_attempt_at > $2", webhook_id, now)
    _wake(ctx)
    return _webhook(row)


def _delivery(row: asyncpg.Record) -> Delivery:
    return Delivery(id=row["id"], kind=row["kind"], seq=row["seq"], attempts=row["attempts"],
                    last_status_code=row["last_status_code"], last_error=row["last_error"],
                    created_at=row["created_at"], delivered_at=row["delivered_at"],
                    next_attempt_at=row["next_attempt_at"])


_DELIVERY_COLUMNS = ("id, kind, seq, attempts, last_status_code, last_error, created_at, delivered_at,"
                     " next_attempt_at")


async def list_deliveries(ctx: AppContext, principal: Principal, webhook_id: int) -> list[Delivery]:
    async with ctx.pool.acquire() as conn:
        await _own(conn, principal, webhook_id)
        rows = await conn.fetch(f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE webhook_id = $1"
                                f" ORDER BY id DESC LIMIT {DELIVERY_LOG_LIMIT}", webhook_id)
    return [_delivery(row) for row in rows]


async def queue_ping(ctx: AppContext, principal: Principal, webhook_id: int) -> Delivery:
    """A `ping` queued behind whatever this webhook has pending, sent by the delivery loop like any event."""
    now = ctx.clock()
    body = encoder.encode(Envelope(channel="stream", type="ping", market=None, seq=None, ts=now,
                                   data={"webhook_id": webhook_id}))
    async with ctx.pool.acquire() as conn, conn.transaction():
        await _own(conn, principal, webhook_id)
        row = await conn.fetchrow(
            "INSERT INTO webhook_deliveries (webhook_id, seq, kind, body, created_at, next_attempt_at)"
            f" VALUES ($1, NULL, 'ping', $2, $3, $3) RETURNING {_DELIVERY_COLUMNS}", webhook_id, body, now)
    _wake(ctx)
    return _delivery(row)
