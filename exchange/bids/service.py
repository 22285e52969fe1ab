from __future__ import annotations

from datetime import datetime

import asyncpg
import msgspec

from exchange.bids.schemas import Bid, BidCost, BidCreate, QuoteRequest
from exchange.core.context import AppContext, request_hash
from exchange.core import metrics
from exchange.core.errors import ApiError, Conflict, InvalidField, NotFound
from exchange.core.bounds import BIGINT_MAX, check_time, parse_cursor
from exchange.core.money import cost_micros, format_money, money_field
from exchange.bids import lifecycle as bid_lifecycle
from exchange.bids.lifecycle import BidEvent
from exchange.leases.lifecycle import PREEMPTION_REASONS
from exchange.ledger import service as ledger

_bid_encoder = msgspec.json.Encoder()
CLOSE_EVENTS = {"cancelled": BidEvent.CANCEL, "expired": BidEvent.EXPIRE}
BID_COLUMNS = ("id, account_id, market, gpus, duration_s, limit_price, client_order_id, min_survival, min_notice_s,"
               " time_in_force, expire_at, requeue_on_preempt, status, hold_amount, unfilled_reason,"
               " unfilled_shortfall, created_at, updated_at, request_hash")


def to_bid(row: asyncpg.Record) -> Bid:
    shortfall = row["unfilled_shortfall"]
    return Bid(id=row["id"], market=row["market"], gpus=row["gpus"], duration_s=row["duration_s"],
               limit_price=format_money(row["limit_price"]), client_order_id=row["client_order_id"],
               min_survival=row["min_survival"], min_notice_s=row["min_notice_s"],
               time_in_force=row["time_in_force"], expire_at=row["expire_at"],
               requeue_on_preempt=row["requeue_on_preempt"], status=row["status"],
               hold=format_money(row["hold_amount"]), unfilled_reason=row["unfilled_reason"],
               unfilled_shortfall=None if shortfall is None else format_money(shortfall),
               created_at=row["created_at"], updated_at=row["updated_at"])


def unknown_market(market: str) -> InvalidField:
    return InvalidField("market", f"unknown market {market!r} (see GET /v1/markets)")


def validate_bid(ctx: AppContext, data: BidCreate | QuoteRequest, now: datetime) -> int:
    """Checks a bid's terms beyond their shape (placed or quoted); returns the limit price in
    micro-dollars."""
    settings = ctx.settings
    if data.gpus > settings.max_gang_gpus:
        raise InvalidField("gpus", f"at most {settings.max_gang_gpus} GPUs in one gang")
    if not settings.min_duration_s <= data.duration_s <= settings.max_duration_s:
        raise InvalidField("duration_s", f"must be between {settings.min_duration_s} and {settings.max_duration_s} seconds")
    limit = money_field("limit_price", data.limit_price)
    if limit <= 0:
        raise InvalidField("limit_price", "must be greater than zero")
    if data.time_in_force == "gtd" and data.expire_at is None:
        raise InvalidField("expire_at", "time_in_force gtd needs expire_at")
    # The hold is computed in Python's unbounded ints: a huge limit x 1,024 GPUs x 30 days is far past
    # bigint; no account could fund it, but it must be refused here, not overflow in the ledger.
    if cost_micros(limit, data.gpus, data.duration_s) > BIGINT_MAX:
        raise InvalidField("limit_price", f"limit_price x gpus x duration_s needs a hold above"
                                          f" {format_money(BIGINT_MAX)}, more than any account can hold")
    if data.expire_at is not None:
        if data.time_in_force == "ioc":
            raise InvalidField("expire_at", "an ioc bid cannot carry expire_at")
        check_time("expire_at", data.expire_at)
        if data.expire_at <= now:
            raise InvalidField("expire_at", "must be in the future")
    return limit


async def place_bid(ctx: AppContext, account_id: int, data: BidCreate) -> tuple[Bid, bool]:
    """Rest a bid and hold `limit × gpus × duration` of the tenant's funds. Returns (bid, replayed)."""
    try:
        bid, replayed = await _place_bid(ctx, account_id, data)
    except ApiError as refusal:
        metrics.BIDS_REFUSED.labels(refusal.code).inc()
        raise
    if not replayed:
        metrics.BIDS_PLACED.labels(bid.market).inc()
    return bid, replayed


async def _place_bid(ctx: AppContext, account_id: int, data: BidCreate) -> tuple[Bid, bool]:
    now = ctx.clock()
    async with ctx.pool.acquire() as conn, conn.transaction():
        row, replayed = await insert_bid(conn, ctx, account_id, data, now)
    return to_bid(row), replayed


async def insert_bid(conn: asyncpg.Connection, ctx: AppContext, account_id: int, data: BidCreate,
                     now: datetime) -> tuple[asyncpg.Record, bool]:
    """Validate a bid, INSERT it and hold its funds on `conn`, inside the caller's transaction (the
    simulation holds such a transaction open across a tick). Returns (row, replayed): a retry with
    the same client_order_id and body returns the stored bid and moves nothing."""
    fingerprint = request_hash(_bid_encoder.encode(data))
    try:
        limit = validate_bid(ctx, data, now)
    except InvalidField:
        # A retry of a stored bid answers with it even when its body no longer validates now (a
        # good-till-date bid retried after its expire_at): the check costs a query only on refusal.
        existing = await _stored_retry(conn, account_id, data.client_order_id, fingerprint)
        if existing is None:
            raise
        return existing, True
    # expire_at given with the default tif means good-till-date.
    tif = "gtd" if data.expire_at is not None else data.time_in_force
    hold = cost_micros(limit, data.gpus, data.duration_s)
    try:
        row = await conn.fetchrow(
            f"INSERT INTO bids (account_id, market, gpus, duration_s, limit_price, min_survival, min_notice_s,"
            f" time_in_force, expire_at, client_order_id, request_hash, requeue_on_preempt, status, hold_amount,"
            f" created_at, updated_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,'open',$13,$14,$14)"
            f" ON CONFLICT (account_id, client_order_id) DO NOTHING RETURNING {BID_COLUMNS}",
            account_id, data.market, data.gpus, data.duration_s, limit, data.min_survival, data.min_notice_s,
            tif, data.expire_at, data.client_order_id, fingerprint, data.requeue_on_preempt, hold, now)
    except asyncpg.ForeignKeyViolationError:  # the market does not exist: no bid, no hold
        raise unknown_market(data.market) from None
    if row is not None:
        await ledger.place_hold(conn, account_id=account_id, amount=hold, now=now, ref_type="bid", ref_id=row["id"])
        return row, False
    # The client_order_id exists (a retry, or a racing duplicate that committed first: under read
    # committed this statement sees it).
    existing = await conn.fetchrow(
        f"SELECT {BID_COLUMNS} FROM bids WHERE account_id = $1 AND client_order_id = $2",
        account_id, data.client_order_id)
    if existing["request_hash"] != fingerprint:
        raise Conflict("idempotency_conflict", "this client_order_id was used for a different bid",
                       field="client_order_id")
    return existing, True


async def _stored_retry(conn: asyncpg.Connection, account_id: int, client_order_id: str,
                        fingerprint: bytes) -> asyncpg.Record | None:
    row = await conn.fetchrow(f"SELECT {BID_COLUMNS} FROM bids WHERE account_id = $1 AND client_order_id = $2",
                              account_id, client_order_id)
    return row if row is not None and row["request_hash"] == fingerprint else None


async def get_bid(ctx: AppContext, account_id: int, bid_id: int) -> Bid:
    row = await ctx.pool.fetchrow(f"SELECT {BID_COLUMNS} FROM bids WHERE id = $1 AND account_id = $2", bid_id, account_id)
    if row is None:
        raise NotFound(f"bid {bid_id}")
    return to_bid(row)


async def list_bids(ctx: AppContext, account_id: int, status: str | None, cursor: str | None,
                    limit: int) -> tuple[list[Bid], str | None]:
    before = parse_cursor(cursor)
    rows = await ctx.pool.fetch(
        f"SELECT {BID_COLUMNS} FROM bids WHERE account_id = $1 AND ($2::text IS NULL OR status = $2) AND id < $3"
        f" ORDER BY id DESC LIMIT $4", account_id, status, before, limit + 1)
    items = [to_bid(r) for r in rows[:limit]]
    return items, (str(items[-1].id) if len(rows) > limit else None)


async def close_bid(conn: asyncpg.Connection, bid_id: int, status: str, now: datetime) -> asyncpg.Record | None:
    """End an open bid (cancelled/expired) and release its hold; None if it was not open."""
    row = await conn.fetchrow(
        "SELECT id, account_id, hold_amount FROM bids WHERE id = $1 AND status = 'open' FOR UPDATE", bid_id)
    if row is None:
        return None
    moved = await bid_lifecycle.apply(conn, bid_id, CLOSE_EVENTS[status], now)
    assert moved, f"bid {bid_id} was locked open"
    await ledger.release_hold(conn, account_id=row["account_id"], amount=row["hold_amount"], now=now,
                              ref_type="bid", ref_id=bid_id)
    metrics.BIDS_CLOSED.labels(status).inc()
    return row


async def cancel_bid(ctx: AppContext, account_id: int, bid_id: int) -> Bid:
    now = ctx.clock()
    async with ctx.pool.acquire() as conn, conn.transaction():
        row = await cancel_bid_on(conn, account_id, bid_id, now)
    return to_bid(row)


async def cancel_bid_on(conn: asyncpg.Connection, account_id: int, bid_id: int, now: datetime) -> asyncpg.Record:
    """Cancel the tenant's bid on `conn`, inside the caller's transaction; returns its row. A bid
    cancelled already answers as cancelled (a retried cancel); a filled or expired one is a conflict."""
    owner = await conn.fetchval("SELECT account_id FROM bids WHERE id = $1", bid_id)
    if owner != account_id:
        raise NotFound(f"bid {bid_id}")
    closed = await close_bid(conn, bid_id, "cancelled", now)
    row = await conn.fetchrow(f"SELECT {BID_COLUMNS} FROM bids WHERE id = $1", bid_id)
    if closed is None and row["status"] != "cancelled":
        raise Conflict("bid_not_open", f"bid {bid_id} is {row['status']} and can no longer be cancelled")
    return row


async def expire_bids(conn: asyncpg.Connection, now: datetime) -> int:
    """Good-till-date bids past their expire_at end as expired and release their hold (inside the
    caller's transaction)."""
    ids = [r["id"] for r in await conn.fetch(
        "SELECT id FROM bids WHERE status = 'open' AND time_in_force = 'gtd' AND expire_at <= $1 ORDER BY id", now)]
    for bid_id in ids:
        await close_bid(conn, bid_id, "expired", now)
    return len(ids)


async def requeue_bid(conn: asyncpg.Connection, bid_id: int, now: datetime) -> bool:
    """Reopen a filled bid whose lease was preempted, if it asked for that; it keeps its id, so it
    keeps its time priority in the book. Returns whether it is back in the book."""
    bid = await conn.fetchrow("SELECT * FROM bids WHERE id = $1 FOR UPDATE", bid_id)
    if bid is None or not bid["requeue_on_preempt"] or bid["status"] != "filled":
        return False
    hold = cost_micros(bid["limit_price"], bid["gpus"], bid["duration_s"])
    try:
        async with conn.transaction():
            await ledger.place_hold(conn, account_id=bid["account_id"], amount=hold, now=now, ref_type="bid",
                                    ref_id=bid_id)
            await bid_lifecycle.apply(conn, bid_id, BidEvent.REQUEUE, now, hold_amount=hold)
    except ApiError:
        await conn.execute("UPDATE bids SET unfilled_reason = 'requeue_insufficient_funds' WHERE id = $1", bid_id)
        return False
    return True


async def bid_cost(ctx: AppContext, account_id: int, bid_id: int) -> BidCost:
    """What a bid cost across every lease it went through (preemptions and re-placements)."""
    from exchange.leases.service import hours

    if await ctx.pool.fetchval("SELECT account_id FROM bids WHERE id = $1", bid_id) != account_id:
        raise NotFound(f"bid {bid_id}")
    row = await ctx.pool.fetchrow(
        "SELECT count(*) AS leases, count(*) FILTER (WHERE end_reason = ANY($2::text[]))"
        " AS preempted, coalesce(sum(billed_gpu_s), 0)::bigint AS gpu_s,"
        " coalesce(sum(billed_amount), 0)::bigint AS charged FROM leases WHERE bid_id = $1", bid_id,
        [str(r) for r in PREEMPTION_REASONS])
    return BidCost(bid_id=bid_id, leases=row["leases"], preemptions=row["preempted"],
                   billed_gpu_hours=hours(row["gpu_s"]), charged=format_money(row["charged"]))
