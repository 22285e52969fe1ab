from __future__ import annotations

import asyncpg

from exchange.core.auth import Principal
from exchange.core.bounds import check_times
from exchange.core.context import AppContext
from exchange.core.errors import Conflict, InvalidField, NotFound
from exchange.core.money import format_money, money_field
from exchange.hosts.service import host_for
from exchange.offers.schemas import Offer, OfferCreate

_COLUMNS = ("id, host_id, model, gpus, floor_price, available_from, available_until, firm_until,"
            " reclaim_notice_s, reclaim_rate_per_h, status, created_at")


def to_offer(row: asyncpg.Record) -> Offer:
    values = dict(row)
    values["floor_price"] = format_money(values["floor_price"])
    return Offer(**{k: values[k] for k in Offer.__struct_fields__})


async def create_offer(ctx: AppContext, principal: Principal, data: OfferCreate) -> Offer:
    """Publish a block of a host's GPUs. Only GPUs the host reported, never more than it has, and
    never twice for overlapping windows."""
    check_times(data, "available_until", "available_from", "firm_until")
    floor = money_field("floor_price", data.floor_price)
    now = ctx.clock()
    available_from = max(data.available_from or now, now)
    if data.available_until <= available_from:
        raise InvalidField("available_until", "must be later than available_from and than now")
    if data.firm_until is not None and not (available_from <= data.firm_until <= data.available_until):
        raise InvalidField("firm_until", "must lie between available_from and available_until")
    async with ctx.pool.acquire() as conn, conn.transaction():
        await host_for(conn, principal, data.host_id)
        # Lock the host so two offers racing for the same GPUs are checked one after the other.
        await conn.execute("SELECT id FROM hosts WHERE id = $1 FOR UPDATE", data.host_id)
        counts = {r["model"]: r["n"] for r in await conn.fetch(
            "SELECT model, count(*) AS n FROM gpus WHERE host_id = $1 AND present GROUP BY model", data.host_id)}
        if not counts:
            raise InvalidField("host_id", "the host has reported no GPUs yet (PUT /v1/agent/inventory)")
        model = data.model
        if model is None:
            if len(counts) > 1:
                raise InvalidField("model", f"the host has several models ({', '.join(sorted(counts))}): name one")
            model = next(iter(counts))
        if model not in counts:
            raise InvalidField("model", f"the host reported no {model} GPUs")
        if data.gpus > counts[model]:
            raise InvalidField("gpus", f"the host reported only {counts[model]} {model} GPUs")
        overlap = await conn.fetchval(
            "SELECT id FROM offers WHERE host_id = $1 AND model = $2 AND status = 'live'"
            " AND available_from < $4 AND available_until > $3 LIMIT 1",
            data.host_id, model, available_from, data.available_until)
        if overlap:
            raise Conflict("offer_overlaps", f"offer {overlap} already publishes this host's GPUs in that window",
                           field="available_from")
        row = await conn.fetchrow(
            f"INSERT INTO offers (host_id, model, gpus, floor_price, available_from, available_until, firm_until,"
            f" reclaim_notice_s, reclaim_rate_per_h, created_at) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10)"
            f" RETURNING {_COLUMNS}",
            data.host_id, model, data.gpus, floor, available_from, data.available_until, data.firm_until,
            data.reclaim_notice_s, data.reclaim_rate_per_h, now)
    return to_offer(row)


async def _visible_offer(ctx: AppContext, principal: Principal, offer_id: int) -> asyncpg.Record:
    row = await ctx.pool.fetchrow(
        f"SELECT {_COLUMNS}, (SELECT owner_id FROM hosts h WHERE h.id = o.host_id) AS owner_id"
        f" FROM offers o WHERE id = $1", offer_id)
    if row is None:
        raise NotFound(f"offer {offer_id}")
    visible = (principal.role == "admin" or (principal.role == "agent" and principal.host_id == row["host_id"])
               or (principal.role == "owner" and principal.account_id == row["owner_id"]))
    if not visible:
        raise NotFound(f"offer {offer_id}")
    return row


async def get_offer(ctx: AppContext, principal: Principal, offer_id: int) -> Offer:
    return to_offer(await _visible_offer(ctx, principal, offer_id))


async def list_offers(ctx: AppContext, principal: Principal, status: str | None) -> list[Offer]:
    if principal.role == "agent":
        scope, arg = "o.host_id = $1", principal.host_id
    else:
        scope, arg = "h.owner_id = $1", principal.account_id
    rows = await ctx.pool.fetch(
        f"SELECT {', '.join('o.' + c.strip() for c in _COLUMNS.split(','))} FROM offers o"
        f" JOIN hosts h ON h.id = o.host_id WHERE {scope} AND ($2::text IS NULL OR o.status = $2) ORDER BY o.id",
        arg, status)
    return [to_offer(r) for r in rows]


async def withdraw_offer(ctx: AppContext, principal: Principal, offer_id: int) -> Offer:
    await _visible_offer(ctx, principal, offer_id)
    row = await ctx.pool.fetchrow(
        f"UPDATE offers SET status = 'withdrawn', withdrawn_at = $2 WHERE id = $1 RETURNING {_COLUMNS}",
        offer_id, ctx.clock())
    return to_offer(row)
