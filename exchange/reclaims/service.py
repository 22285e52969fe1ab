"""Owner reclaims. Executed now: free GPUs are taken first (no tenant is disturbed), then spot
leases chosen by the victim strategy end after their offer's reclaim notice; firm leases are never
reclaimed (a shortfall is reported instead). Scheduled ahead: an internal reservation, which the
matching engine plans around (no spot lease is placed across it), executed when its time comes."""
from __future__ import annotations

from datetime import datetime

import asyncpg
import msgspec

from exchange.core.auth import Principal
from exchange.core.bounds import check_times
from exchange.core.context import AppContext, request_hash
from exchange.core.errors import Conflict, InvalidField, NotFound
from exchange.hosts.service import host_for
from exchange.leases import lifecycle
from exchange.leases.lifecycle import LeaseEvent, lock_lease_changes
from exchange.reclaims.schemas import Reclaim, ReclaimCreate, ReclaimedLease
from exchange.reclaims.victims import VICTIM_STRATEGIES, Gang

DEFAULT_STRATEGY = "cheapest_first"
_reclaim_encoder = msgspec.json.Encoder()
# The per-owner lock that serialises an owner's reclaims (capacity checks and idempotency keys).
_OWNER_RECLAIMS_LOCK = 0x7263


async def _scope_hosts(conn: asyncpg.Connection, owner_id: int, model: str, host_id: int | None) -> list[int]:
    rows = await conn.fetch(
        "SELECT DISTINCT h.id FROM hosts h JOIN gpus g ON g.host_id = h.id AND g.present AND g.model = $2"
        " WHERE h.owner_id = $1 AND ($3::bigint IS NULL OR h.id = $3) ORDER BY h.id", owner_id, model, host_id)
    return [r["id"] for r in rows]


async def _committed_on(conn: asyncpg.Connection, hosts: list[int], model: str) -> dict[int, int]:
    """GPUs of `model` that active reclaims have taken on each host, however they are held now (idle,
    or still in a victim lease under notice): the capacity no new reclaim can take again."""
    rows = await conn.fetch(
        "SELECT rg.host_id, sum(rg.gpus)::int AS gpus FROM reclaim_gpus rg JOIN reclaims r ON r.id = rg.reclaim_id"
        " WHERE r.status = 'active' AND r.model = $2 AND rg.host_id = ANY($1::bigint[]) GROUP BY rg.host_id",
        hosts, model)
    return {r["host_id"]: r["gpus"] for r in rows}


async def _outstanding_on(conn: asyncpg.Connection, hosts: list[int], model: str) -> dict[int, int]:
    """GPUs active reclaims hold on each host that no live lease holds (the view
    reclaim_outstanding, migration 0012: the one definition the book and the tick read too)."""
    rows = await conn.fetch("SELECT host_id, gpus::int FROM reclaim_outstanding"
                            " WHERE host_id = ANY($1::bigint[]) AND model = $2", hosts, model)
    return {r["host_id"]: r["gpus"] for r in rows}


async def create_reclaim(ctx: AppContext, principal: Principal, data: ReclaimCreate) -> Reclaim:
    return (await place_reclaim(ctx, principal, data))[0]


async def _stored_retry(conn, owner_id: int, data: ReclaimCreate, fingerprint: bytes) -> int | None:
    """The reclaim this request retries (same owner, key and body), None if the key is new; another
    body under the key is a conflict."""
    if data.idempotency_key is None:
        return None
    row = await conn.fetchrow("SELECT id, request_hash FROM reclaims WHERE owner_id = $1 AND idempotency_key = $2",
                              owner_id, data.idempotency_key)
    if row is None:
        return None
    if row["request_hash"] != fingerprint:
        raise Conflict("idempotency_conflict", "this idempotency_key was used for a different reclaim",
                       field="idempotency_key")
    return row["id"]


async def place_reclaim(ctx: AppContext, principal: Principal, data: ReclaimCreate) -> tuple[Reclaim, bool]:
    """Create (and, when due, execute) a reclaim. Returns (reclaim, replayed): a retry with the same
    idempotency key and body returns the first reclaim as it stands now and changes nothing."""
    fingerprint = request_hash(_reclaim_encoder.encode(data))
    # A retry answers with its reclaim even when its body no longer validates (an `at` now past).
    replayed = await _stored_retry(ctx.pool, principal.account_id, data, fingerprint)
    if replayed is not None:
        return await get_reclaim(ctx, principal, replayed), True
    now = ctx.clock()
    check_times(data, "at", "until")
    at = data.at if data.at is not None and data.at > now else now
    if data.until is not None and data.until <= at:
        raise InvalidField("until", "must be later than at (and than now)")
    strategy = data.strategy or ctx.settings.reclaim_strategy
    if strategy not in VICTIM_STRATEGIES:
        raise InvalidField("strategy", f"one of {', '.join(sorted(VICTIM_STRATEGIES))}")
    async with ctx.pool.acquire() as conn, conn.transaction():
        await lock_lease_changes(conn, now)
        # One reclaim at a time per owner: capacity checks see each other's takings, and two racing
        # retries of one key see each other (the second finds the first's reclaim).
        await conn.execute("SELECT pg_advisory_xact_lock($1, $2)", _OWNER_RECLAIMS_LOCK, principal.account_id)
        replayed = await _stored_retry(conn, principal.account_id, data, fingerprint)
        if replayed is not None:
            reclaim_id = replayed
        else:
            reclaim_id = await _insert_reclaim(conn, principal, data, at, strategy, now, fingerprint)
    return await get_reclaim(ctx, principal, reclaim_id), replayed is not None


async def _insert_reclaim(conn: asyncpg.Connection, principal: Principal, data: ReclaimCreate, at: datetime,
                      strategy: str, now: datetime, fingerprint: bytes) -> int:
    if data.host_id is not None:
        await host_for(conn, principal, data.host_id)
    hosts = await _scope_hosts(conn, principal.account_id, data.model, data.host_id)
    if not hosts:
        raise InvalidField("model", f"you have no host with {data.model} GPUs" +
                           (" under that host_id" if data.host_id else ""))
    total = await conn.fetchval("SELECT count(*) FROM gpus WHERE host_id = ANY($1::bigint[]) AND present"
                                " AND model = $2", hosts, data.model)
    taken = sum((await _committed_on(conn, hosts, data.model)).values())
    if data.gpus > total - taken:
        raise InvalidField("gpus", f"only {total - taken} {data.model} GPUs are not reclaimed already")
    reclaim_id = await conn.fetchval(
        "INSERT INTO reclaims (owner_id, model, gpus, host_id, at, until, status, strategy, created_at,"
        " idempotency_key, request_hash) VALUES ($1,$2,$3,$4,$5,$6,'scheduled',$7,$8,$9,$10) RETURNING id",
        principal.account_id, data.model, data.gpus, data.host_id, at, data.until, strategy, now,
        data.idempotency_key, fingerprint if data.idempotency_key is not None else None)
    if at <= now:
        await execute_reclaim(conn, reclaim_id, now)
    return reclaim_id


async def execute_reclaim(conn: asyncpg.Connection, reclaim_id: int, now: datetime) -> None:
    reclaim = await conn.fetchrow("SELECT * FROM reclaims WHERE id = $1 FOR UPDATE", reclaim_id)
    if reclaim["status"] != "scheduled":
        return
    # Leases that have run their course end first: a reclaim never takes (nor calls preempted, nor
    # refunds, nor requeues) work that is already done, even between two ticks.
    await lifecycle.end_due(conn, now)
    hosts = await _scope_hosts(conn, reclaim["owner_id"], reclaim["model"], reclaim["host_id"])
    outstanding = await _outstanding_on(conn, hosts, reclaim["model"])
    idle = {r["host_id"]: r["n"] for r in await conn.fetch(
        "SELECT g.host_id, count(*)::int AS n FROM gpus g WHERE g.host_id = ANY($1::bigint[]) AND g.present"
        " AND g.model = $2 AND NOT EXISTS (SELECT 1 FROM lease_gpus lg WHERE lg.uuid = g.uuid AND lg.live)"
        " GROUP BY g.host_id", hosts, reclaim["model"])}
    need = reclaim["gpus"]
    taking: list[tuple[int, int | None, int]] = []  # (host, victim lease or None for idle GPUs, GPUs)
    for host in hosts:  # idle GPUs first: taking them disturbs no tenant
        free = max(0, idle.get(host, 0) - outstanding.get(host, 0))
        take = min(free, need)
        if take:
            taking.append((host, None, take))
            need -= take
    idle_taken = reclaim["gpus"] - need
    if need > 0:
        rows = await conn.fetch(
            # A victim gives back only the GPUs its host still has (one may have left the inventory).
            "SELECT l.id, l.bid_id, l.host_id, l.price,"
            " (SELECT count(*) FROM gpus g WHERE g.uuid = ANY(l.gpu_uuids) AND g.host_id = l.host_id"
            "   AND g.present)::int AS gpus"
            " FROM leases l"
            " WHERE l.bid_id IN (SELECT bid_id FROM leases WHERE host_id = ANY($1::bigint[]) AND tier = 'spot'"
            "   AND status = 'active' AND market = $2)"
            # Only the reclaiming owner's leases: a gang never spans owners (fabrics are per owner),
            # but one placed before migration 0009 may, and another owner's sale is not this one's
            # to end (nor to refund from that owner's earnings).
            " AND l.host_id IN (SELECT id FROM hosts WHERE owner_id = $4)"
            " AND l.status = 'active' AND l.planned_end_at > $3 AND l.reclaim_id IS NULL ORDER BY l.id",
            hosts, reclaim["model"] + "/spot", now, reclaim["owner_id"])
        by_bid: dict[int, list[asyncpg.Record]] = {}
        for row in rows:
            by_bid.setdefault(row["bid_id"], []).append(row)
        gangs = [Gang(bid_id=bid, lease_ids=tuple(r["id"] for r in leases),
                      gpus=sum(r["gpus"] for r in leases if r["host_id"] in hosts), price=leases[0]["price"])
                 for bid, leases in by_bid.items()]
        # A gang whose GPUs here have all left the inventory gives nothing back: it is not ended for nothing.
        gangs = [gang for gang in gangs if gang.gpus > 0]
        victims = VICTIM_STRATEGIES[reclaim["strategy"]].choose(gangs, need)
        ending = {lease_id for gang in victims for lease_id in gang.lease_ids}
        # A victim whose planned end comes within its notice gets none (it completes as planned);
        # its GPUs come back to the owner no later than a notice would bring them.
        await lifecycle.give_notice(conn, sorted(ending), LeaseEvent.RECLAIM, now, reclaim_id=reclaim_id)
        for row in rows:
            if row["id"] in ending and row["host_id"] in hosts and need > 0 and row["gpus"] > 0:
                take = min(row["gpus"], need)
                taking.append((row["host_id"], row["id"], take))
                need -= take
    # Per source: the idle GPUs are the owner's now; a victim's share once that lease is over.
    await conn.executemany("INSERT INTO reclaim_gpus (reclaim_id, host_id, lease_id, gpus) VALUES ($1, $2, $3, $4)",
                           [(reclaim_id, host, lease_id, gpus) for host, lease_id, gpus in taking])
    await conn.execute("UPDATE reclaims SET status = 'active', executed_at = $2, shortfall = $3, idle_gpus = $4"
                       " WHERE id = $1", reclaim_id, now, max(0, need), idle_taken)


async def run_due_reclaims(conn: asyncpg.Connection, now: datetime) -> int:
    """Execute reservations whose time has come; give back GPUs of reclaims past their `until`."""
    async with conn.transaction():
        await lock_lease_changes(conn, now)
        due = [r["id"] for r in await conn.fetch(
            "SELECT id FROM reclaims WHERE status = 'scheduled' AND at <= $1 ORDER BY at, id", now)]
        for reclaim_id in due:
            await execute_reclaim(conn, reclaim_id, now)
        await conn.execute("UPDATE reclaims SET status = 'released' WHERE status = 'active' AND until <= $1", now)
    return len(due)


async def _visible(conn, principal: Principal, reclaim_id: int) -> asyncpg.Record:
    row = await conn.fetchrow("SELECT * FROM reclaims WHERE id = $1", reclaim_id)
    if row is None or (principal.role != "admin" and row["owner_id"] != principal.account_id):
        raise NotFound(f"reclaim {reclaim_id}")
    return row


def _reclaim_view(row: asyncpg.Record, leases: list[asyncpg.Record]) -> Reclaim:
    return Reclaim(id=row["id"], model=row["model"], gpus=row["gpus"], host_id=row["host_id"], at=row["at"],
                   until=row["until"], status=row["status"], strategy=row["strategy"],
                   taken_free=row["idle_gpus"], shortfall=row["shortfall"],
                   leases=[ReclaimedLease(id=le["id"], host_id=le["host_id"], gpus=le["gpus"], end_at=le["end_at"],
                                          free_of_charge=le["free_of_charge"]) for le in leases],
                   idempotency_key=row["idempotency_key"], created_at=row["created_at"])


# A victim that completes within its notice is not told; its GPUs come back at its planned end.
# Only the reclaiming owner's leases are shown (older data may hold another owner's under a reclaim).
_RECLAIMED_LEASES = ("SELECT l.reclaim_id, l.id, l.host_id, l.gpus, coalesce(l.end_at, l.planned_end_at) AS end_at,"
                     " l.free_of_charge FROM leases l JOIN reclaims r ON r.id = l.reclaim_id"
                     " JOIN hosts h ON h.id = l.host_id AND h.owner_id = r.owner_id"
                     " WHERE l.reclaim_id = ANY($1::bigint[]) ORDER BY l.id")


async def get_reclaim(ctx: AppContext, principal: Principal, reclaim_id: int) -> Reclaim:
    row = await _visible(ctx.pool, principal, reclaim_id)
    return _reclaim_view(row, await ctx.pool.fetch(_RECLAIMED_LEASES, [reclaim_id]))


async def list_reclaims(ctx: AppContext, principal: Principal) -> list[Reclaim]:
    """The owner's latest 200 reclaims, newest first (two queries, whatever their number)."""
    rows = await ctx.pool.fetch("SELECT * FROM reclaims WHERE owner_id = $1 ORDER BY id DESC LIMIT 200",
                                principal.account_id)
    leases: dict[int, list[asyncpg.Record]] = {r["id"]: [] for r in rows}
    for le in await ctx.pool.fetch(_RECLAIMED_LEASES, list(leases)):
        leases[le["reclaim_id"]].append(le)
    return [_reclaim_view(r, leases[r["id"]]) for r in rows]


async def release_reclaim(ctx: AppContext, principal: Principal, reclaim_id: int) -> Reclaim:
    """The owner gives the GPUs back to the market (or cancels a reservation)."""
    await _visible(ctx.pool, principal, reclaim_id)
    # A reservation released before its time never ran: it keeps its own window (`until` stays after `at`).
    await ctx.pool.execute("UPDATE reclaims SET status = 'released',"
                           " until = CASE WHEN at < $2 THEN least(coalesce(until, $2), $2) ELSE until END"
                           " WHERE id = $1 AND status <> 'released'", reclaim_id, ctx.clock())
    return await get_reclaim(ctx, principal, reclaim_id)
