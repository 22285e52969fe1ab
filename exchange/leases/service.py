from __future__ import annotations

import asyncpg

from exchange.core.auth import Principal
from exchange.core.bounds import parse_cursor
from exchange.core.context import AppContext
from exchange.core.errors import NotFound
from exchange.core.money import format_money
from exchange.leases.schemas import Lease, OwnerLease

_COLUMNS = ("l.id, l.account_id, l.bid_id, l.market, l.tier, l.host_id, l.offer_id, l.gpus, l.gpu_uuids, l.price, l.limit_price,"
            " l.start_at, l.planned_end_at, l.end_at, l.status, l.end_reason, l.hold_amount, l.metered_gpu_s,"
            " l.billed_gpu_s, l.billed_amount, l.fees_amount, l.energy_mj, l.settled_at")


def hours(seconds: int) -> str:
    return f"{seconds / 3600:.6f}"


def kwh(millijoules: int) -> str:
    return f"{millijoules / 3.6e9:.6f}"


def to_lease(row: asyncpg.Record) -> Lease:
    return Lease(id=row["id"], bid_id=row["bid_id"], market=row["market"], tier=row["tier"], host_id=row["host_id"],
                 offer_id=row["offer_id"], gpus=row["gpus"], gpu_uuids=list(row["gpu_uuids"]),
                 price=format_money(row["price"]), limit_price=format_money(row["limit_price"]),
                 start_at=row["start_at"], planned_end_at=row["planned_end_at"], end_at=row["end_at"],
                 status=row["status"], end_reason=row["end_reason"], hold=format_money(row["hold_amount"]),
                 metered_gpu_hours=hours(row["metered_gpu_s"]), billed_gpu_hours=hours(row["billed_gpu_s"]),
                 charged=format_money(row["billed_amount"]), fees=format_money(row["fees_amount"]),
                 energy_kwh=kwh(row["energy_mj"]), settled_at=row["settled_at"])


def to_owner_lease(row: asyncpg.Record) -> OwnerLease:
    return OwnerLease(id=row["id"], market=row["market"], tier=row["tier"], host_id=row["host_id"],
                      offer_id=row["offer_id"], gpus=row["gpus"], gpu_uuids=list(row["gpu_uuids"]),
                      price=format_money(row["price"]), start_at=row["start_at"], planned_end_at=row["planned_end_at"],
                      end_at=row["end_at"], status=row["status"], end_reason=row["end_reason"],
                      metered_gpu_hours=hours(row["metered_gpu_s"]), billed_gpu_hours=hours(row["billed_gpu_s"]),
                      charged=format_money(row["billed_amount"]), fees=format_money(row["fees_amount"]),
                      energy_kwh=kwh(row["energy_mj"]), settled_at=row["settled_at"])


def view_for(principal: Principal):
    """The lease shape a caller gets: the tenant's own view for tenants and the admin; the
    counterparty view (no limit, hold or bid id) for owners and agents."""
    return to_owner_lease if principal.role in ("owner", "agent") else to_lease


def visibility(principal: Principal) -> tuple[str, list]:
    """Which leases a caller may see: a tenant its own, an owner those on its hosts, an agent its
    host's, the admin all. The SQL condition and its argument."""
    if principal.role == "tenant":
        return "l.account_id = $1", [principal.account_id]
    if principal.role == "owner":
        return "l.host_id IN (SELECT id FROM hosts WHERE owner_id = $1)", [principal.account_id]
    if principal.role == "agent":
        return "l.host_id = $1", [principal.host_id]
    return "$1::bigint IS NULL", [None]


async def list_leases(ctx: AppContext, principal: Principal, status: str | None, cursor: str | None,
                      limit: int) -> tuple[list[Lease] | list[OwnerLease], str | None]:
    before = parse_cursor(cursor)
    scope, args = visibility(principal)
    rows = await ctx.pool.fetch(
        f"SELECT {_COLUMNS} FROM leases l WHERE {scope} AND ($2::text IS NULL OR l.status = $2) AND l.id < $3"
        f" ORDER BY l.id DESC LIMIT $4", *args, status, before, limit + 1)
    view = view_for(principal)
    items = [view(r) for r in rows[:limit]]
    return items, (str(items[-1].id) if len(rows) > limit else None)


async def get_lease(ctx: AppContext, principal: Principal, lease_id: int) -> Lease | OwnerLease:
    scope, args = visibility(principal)
    row = await ctx.pool.fetchrow(f"SELECT {_COLUMNS} FROM leases l WHERE {scope} AND l.id = $2", *args, lease_id)
    if row is None:
        raise NotFound(f"lease {lease_id}")
    return view_for(principal)(row)


async def lease_views_for(pool: asyncpg.Pool, account_id: int, lease_ids: list[int]) -> dict[int, Lease | OwnerLease]:
    """Leases by id as this account sees them, in one query (for private events: the stream has
    checked whose they are): its own leases as their tenant, the others (leases on its hosts) in
    the owner's view, which carries no tenant limit, hold or bid id."""
    rows = await pool.fetch(f"SELECT {_COLUMNS} FROM leases l WHERE l.id = ANY($1::bigint[])", lease_ids)
    return {row["id"]: to_lease(row) if row["account_id"] == account_id else to_owner_lease(row) for row in rows}
