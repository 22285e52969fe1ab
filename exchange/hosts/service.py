from __future__ import annotations

import asyncpg

from exchange.core.auth import Principal, hash_secret, new_agent_token
from exchange.core.context import AppContext
from exchange.core.errors import Conflict, Forbidden, InvalidField, NotFound
from exchange.core.money import format_money
from exchange.leases.lifecycle import lock_lease_changes
from exchange.hosts.schemas import AgentIdentity, Host, HostCreate, HostCreated, HostEarnings, HostGpu, Inventory
from exchange.markets.service import ensure_markets


async def create_host(ctx: AppContext, owner_id: int, data: HostCreate) -> HostCreated:
    token = new_agent_token()
    try:
        host_id = await ctx.pool.fetchval(
            "INSERT INTO hosts (owner_id, name, fabric, agent_token_hash, created_at) VALUES ($1,$2,$3,$4,$5)"
            " RETURNING id", owner_id, data.name, data.fabric, hash_secret(token), ctx.clock())
    except asyncpg.UniqueViolationError:
        raise Conflict("name_taken", f"you have a host named {data.name!r} already", field="name") from None
    return HostCreated(id=host_id, name=data.name, fabric=data.fabric, agent_token=token)


async def host_for(ctx: AppContext | asyncpg.Connection, principal: Principal, host_id: int) -> asyncpg.Record:
    """The host row if the caller may act on it: its owner, or its own agent. Another owner's host
    is 'not found' (its existence is not theirs to know); another host's agent is forbidden."""
    conn = ctx.pool if isinstance(ctx, AppContext) else ctx
    row = await conn.fetchrow("SELECT * FROM hosts WHERE id = $1", host_id)
    if principal.role == "agent":
        if principal.host_id != host_id:
            raise Forbidden("an agent token acts only for its own host")
        return row
    if row is None or (principal.role != "admin" and row["owner_id"] != principal.account_id):
        raise NotFound(f"host {host_id}")
    return row


async def list_hosts(ctx: AppContext, principal: Principal) -> list[Host]:
    where, args = ("", []) if principal.role == "admin" else ("WHERE h.owner_id = $1", [principal.account_id])
    rows = await ctx.pool.fetch(f"SELECT * FROM hosts h {where} ORDER BY id", *args)
    return [await _host(ctx, r) for r in rows]


async def get_host(ctx: AppContext, principal: Principal, host_id: int) -> Host:
    return await _host(ctx, await host_for(ctx, principal, host_id))


async def _host(ctx: AppContext, row: asyncpg.Record) -> Host:
    gpus = await ctx.pool.fetch(
        "SELECT uuid, model, memory_mb, idx FROM gpus WHERE host_id = $1 AND present ORDER BY idx", row["id"])
    return Host(id=row["id"], name=row["name"], fabric=row["fabric"], owner_id=row["owner_id"],
                created_at=row["created_at"], last_seen_at=row["last_seen_at"],
                gpus=[HostGpu(uuid=g["uuid"], model=g["model"], memory_mb=g["memory_mb"], index=g["idx"]) for g in gpus])


async def agent_identity(ctx: AppContext, principal: Principal) -> AgentIdentity:
    row = await ctx.pool.fetchrow("SELECT id, name, fabric FROM hosts WHERE id = $1", principal.host_id)
    return AgentIdentity(host_id=row["id"], name=row["name"], fabric=row["fabric"])


async def put_inventory(ctx: AppContext, principal: Principal, data: Inventory) -> Host:
    """Replace the host's GPU set with what its agent reports. One physical GPU is sold by one host
    only: a GPU registered to another host moves here only once that host released it (dropped it
    from its inventory) and no live lease holds it; until then the whole report is refused with 409
    naming the GPU, and nothing changes (the other host keeps reporting and metering it)."""
    uuids = [g.uuid for g in data.gpus]
    if len(set(uuids)) != len(uuids):
        raise InvalidField("gpus", "a GPU UUID appears twice")
    host_id = principal.host_id
    now = ctx.clock()
    async with ctx.pool.acquire() as conn, conn.transaction():
        if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM gpus WHERE uuid = ANY($1::text[]) AND host_id <> $2)",
                               uuids, host_id):
            # A move: serialise with the transactions that start leases, so that no lease starts
            # on the GPU at its old host while it moves (first, as that lock must be taken).
            await lock_lease_changes(conn)
        await conn.execute("SELECT id FROM hosts WHERE id = $1 FOR UPDATE", host_id)
        await conn.execute("UPDATE gpus SET present = false WHERE host_id = $1", host_id)
        # The condition is checked on the row as it is when written (also against a racing claim
        # by a third host): a GPU of another host is taken over only if released and not leased.
        stored = {r["uuid"] for r in await conn.fetch(
            "INSERT INTO gpus AS g (uuid, host_id, idx, model, memory_mb, present, reported_at)"
            " SELECT u, $2, i, m, mb, true, $6 FROM unnest($1::text[], $3::int[], $4::text[], $5::int[])"
            "   AS r(u, i, m, mb)"
            " ON CONFLICT (uuid) DO UPDATE SET host_id = EXCLUDED.host_id, idx = EXCLUDED.idx,"
            " model = EXCLUDED.model, memory_mb = EXCLUDED.memory_mb, present = true, reported_at = EXCLUDED.reported_at"
            " WHERE g.host_id = EXCLUDED.host_id OR (NOT g.present"
            "   AND NOT EXISTS (SELECT 1 FROM lease_gpus lg WHERE lg.uuid = g.uuid AND lg.live))"
            " RETURNING g.uuid",
            uuids, host_id, [g.index if g.index is not None else i for i, g in enumerate(data.gpus)],
            [g.model for g in data.gpus], [g.memory_mb for g in data.gpus], now)}
        refused = [u for u in uuids if u not in stored]
        if refused:  # raising rolls the whole report back
            held = await conn.fetchval("SELECT present FROM gpus WHERE uuid = $1", refused[0])
            why = "is in its inventory" if held else "a live lease still holds it there"
            raise Conflict("gpu_on_other_host", f"GPU {refused[0]} is registered to another host ({why});"
                           " it can move only once that host has dropped it and no live lease holds it",
                           field="gpus")
        await conn.execute("UPDATE hosts SET last_seen_at = $2 WHERE id = $1", host_id, now)
        await ensure_markets(conn, {g.model for g in data.gpus}, now)
    return await get_host(ctx, principal, host_id)


async def host_earnings(ctx: AppContext, principal: Principal, host_id: int) -> HostEarnings:
    """What the host's leases have been billed, and what the owner earned after the exchange's fee."""
    from exchange.leases.service import hours, kwh

    await host_for(ctx, principal, host_id)
    row = await ctx.pool.fetchrow(
        "SELECT count(*) AS leases, coalesce(sum(billed_gpu_s), 0)::bigint AS gpu_s,"
        " coalesce(sum(billed_amount), 0)::bigint AS charged, coalesce(sum(fees_amount), 0)::bigint AS fees,"
        " coalesce(sum(energy_mj), 0) AS energy FROM leases WHERE host_id = $1", host_id)
    return HostEarnings(host_id=host_id, leases=row["leases"], billed_gpu_hours=hours(row["gpu_s"]),
                        charged=format_money(row["charged"]), fees=format_money(row["fees"]),
                        earned=format_money(row["charged"] - row["fees"]), energy_kwh=kwh(int(row["energy"])))
