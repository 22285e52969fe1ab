"""The lease lifecycle: the one module that writes a lease's status, end reason, end time and live
GPUs (as nautilus_trader's `OrderStatus::transition`). Every other module asks for an event here.

    active --outbid/reclaim--> ending --due--> ended        (reason kept: outbid / reclaimed)
    active --due-------------> ended (completed)
    active|ending --host_failed--> failed (host_failed)     (no charge after the host's last sample)
    active|ending --gang_failed--> ended (gang_failed)      (a sibling of the gang failed on its host)
    ended, failed: terminal; any event on them is a no-op.

Each writer is one UPDATE gated on the statuses the table allows for its event, so an event that
races another (a reclaim and the tick, a host failure and a due end) applies at most once and never
rewrites a lease that already ended. Preemptions (the reasons that end a lease early, not of its
tenant's doing) are defined once here; the schema's CHECK and the trigger that records preemptions
are tested against these sets (tests/integration/test_lease_lifecycle.py).
"""
from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum

import asyncpg


class LeaseStatus(StrEnum):
    ACTIVE = "active"
    ENDING = "ending"
    ENDED = "ended"
    FAILED = "failed"


class EndReason(StrEnum):
    COMPLETED = "completed"
    OUTBID = "outbid"
    RECLAIMED = "reclaimed"
    HOST_FAILED = "host_failed"
    GANG_FAILED = "gang_failed"


class LeaseEvent(StrEnum):
    OUTBID = "outbid"            # a competing bid pays more: notice, then end
    RECLAIM = "reclaim"          # the owner takes the GPUs back: notice, then end
    DUE = "due"                  # the planned end, or the end of the notice, has come
    HOST_FAILED = "host_failed"  # the lease's host went silent past the failure grace
    GANG_FAILED = "gang_failed"  # another lease of the same gang failed on its host


LIVE = (LeaseStatus.ACTIVE, LeaseStatus.ENDING)
TERMINAL = (LeaseStatus.ENDED, LeaseStatus.FAILED)
# Ended early, not by the tenant's doing: counted in the risk index, recorded in the feed (spot),
# and what puts a `requeue_on_preempt` bid back in the book.
PREEMPTION_REASONS: tuple[EndReason, ...] = (EndReason.OUTBID, EndReason.RECLAIMED, EndReason.HOST_FAILED,
                                             EndReason.GANG_FAILED)

# (status, event) -> (new status, end reason; None keeps the reason the lease has).
TRANSITIONS: dict[tuple[LeaseStatus, LeaseEvent], tuple[LeaseStatus, EndReason | None]] = {
    (LeaseStatus.ACTIVE, LeaseEvent.OUTBID): (LeaseStatus.ENDING, EndReason.OUTBID),
    (LeaseStatus.ACTIVE, LeaseEvent.RECLAIM): (LeaseStatus.ENDING, EndReason.RECLAIMED),
    (LeaseStatus.ACTIVE, LeaseEvent.DUE): (LeaseStatus.ENDED, EndReason.COMPLETED),
    (LeaseStatus.ENDING, LeaseEvent.DUE): (LeaseStatus.ENDED, None),
    (LeaseStatus.ACTIVE, LeaseEvent.HOST_FAILED): (LeaseStatus.FAILED, EndReason.HOST_FAILED),
    (LeaseStatus.ENDING, LeaseEvent.HOST_FAILED): (LeaseStatus.FAILED, EndReason.HOST_FAILED),
    (LeaseStatus.ACTIVE, LeaseEvent.GANG_FAILED): (LeaseStatus.ENDED, EndReason.GANG_FAILED),
    (LeaseStatus.ENDING, LeaseEvent.GANG_FAILED): (LeaseStatus.ENDED, EndReason.GANG_FAILED),
}


def transition(status: LeaseStatus | str, event: LeaseEvent) -> tuple[LeaseStatus, EndReason | None] | None:
    """The status and end reason after `event`, or None when the event does not apply (a terminal
    lease, or a notice for a lease already under notice)."""
    return TRANSITIONS.get((LeaseStatus(status), event))


def sources(event: LeaseEvent) -> list[str]:
    """The statuses from which `event` moves a lease: the gate of its UPDATE."""
    return sorted(str(status) for (status, ev) in TRANSITIONS if ev == event)


def is_preemption(reason: str | None) -> bool:
    return reason in PREEMPTION_REASONS


LEASE_CHANGES_LOCK_KEY = 0x6770_7578_0006


async def lock_lease_changes(conn: asyncpg.Connection, now: datetime | None = None) -> None:
    """Serialise the transactions that start or change leases (ticks, host failures, reclaims,
    settlement): each change makes the `leases_events` trigger lock its tenant's and owner's
    account rows, and two such transactions locking them in opposite orders would deadlock. Call
    first in the transaction. With `now`, the database's triggers stamp their rows with it (the
    injected clock) instead of the server's time."""
    await conn.execute("SELECT pg_advisory_xact_lock($1)", LEASE_CHANGES_LOCK_KEY)
    if now is not None:
        await set_clock(conn, now)


async def set_clock(conn: asyncpg.Connection, now: datetime) -> None:
    """The injected clock for this transaction's triggers (`gpux_now()`, migration 0007)."""
    await conn.execute("SELECT set_config('gpux.now', $1, true)", now.isoformat())


async def _release_gpus(conn: asyncpg.Connection, lease_ids: list[int]) -> None:
    if lease_ids:
        await conn.execute("UPDATE lease_gpus SET live = false WHERE lease_id = ANY($1::bigint[]) AND live", lease_ids)


async def end_due(conn: asyncpg.Connection, now: datetime) -> list[int]:
    """Leases whose planned end, or whose notice, has run out end and free their GPUs."""
    rows = await conn.fetch(
        "UPDATE leases SET status = CASE status WHEN 'active' THEN $2 ELSE $3 END,"
        " end_at = coalesce(end_at, planned_end_at), end_reason = coalesce(end_reason, $4)"
        " WHERE status = ANY($5::text[]) AND ((status = 'active' AND planned_end_at <= $1)"
        "   OR (status = 'ending' AND end_at <= $1)) RETURNING id",
        now, str(TRANSITIONS[(LeaseStatus.ACTIVE, LeaseEvent.DUE)][0]),
        str(TRANSITIONS[(LeaseStatus.ENDING, LeaseEvent.DUE)][0]), str(EndReason.COMPLETED), sources(LeaseEvent.DUE))
    ids = [r["id"] for r in rows]
    await _release_gpus(conn, ids)
    return ids


async def insert_lease(conn: asyncpg.Connection, *, bid_id: int, account_id: int, host_id: int, offer_id: int,
                       market: str, tier: str, uuids: list[str], price: int, limit_price: int, floor_price: int,
                       start_at: datetime, duration_s: int, hold_amount: int, tick_id: int) -> int:
    """A match becomes an active lease holding its GPUs (the unique live index on lease_gpus refuses
    a GPU another live lease holds)."""
    lease_id = await conn.fetchval(
        "INSERT INTO leases (bid_id, account_id, host_id, offer_id, market, tier, gpus, gpu_uuids, price,"
        " limit_price, floor_price, start_at, planned_end_at, status, hold_amount, tick_id, created_at)"
        " VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15,$16,$12) RETURNING id",
        bid_id, account_id, host_id, offer_id, market, tier, len(uuids), uuids, price, limit_price, floor_price,
        start_at, start_at + timedelta(seconds=duration_s), str(LeaseStatus.ACTIVE), hold_amount, tick_id)
    await conn.executemany("INSERT INTO lease_gpus (lease_id, uuid) VALUES ($1, $2)", [(lease_id, u) for u in uuids])
    return lease_id


async def give_notice(conn: asyncpg.Connection, lease_ids: list[int], event: LeaseEvent, now: datetime, *,
                      reclaim_id: int | None = None) -> list[int]:
    """Outbid or reclaimed: each active lease ends after its offer's reclaim notice. A lease whose
    planned end comes before the notice would run out gets none: it completes as planned (so a
    notice never runs past the planned end, and finished work is never called preempted), though a
    reclaim still ties it to itself. A reclaim within the offer's free window makes the lease free of
    charge. Returns the leases told."""
    assert event in (LeaseEvent.OUTBID, LeaseEvent.RECLAIM), event
    if not lease_ids:
        return []
    status, reason = TRANSITIONS[(LeaseStatus.ACTIVE, event)]
    rows = await conn.fetch(
        "UPDATE leases l SET status = $3, end_reason = $4,"
        " end_at = $2::timestamptz + make_interval(secs => o.reclaim_notice_s),"
        " reclaim_id = coalesce($5, l.reclaim_id),"
        " free_of_charge = l.free_of_charge OR ($6 AND $2::timestamptz - l.start_at"
        "   < make_interval(secs => o.free_reclaim_window_s))"
        " FROM offers o WHERE o.id = l.offer_id AND l.id = ANY($1::bigint[]) AND l.status = ANY($7::text[])"
        " AND l.planned_end_at > $2::timestamptz + make_interval(secs => o.reclaim_notice_s)"
        " RETURNING l.id",
        lease_ids, now, str(status), str(reason), reclaim_id, event == LeaseEvent.RECLAIM, sources(event))
    if reclaim_id is not None:
        # The reclaim's victims that complete within their notice run on untold, but their GPUs are
        # the reclaim's when they end: tie them to it, so what a host has leased and reclaimed counts
        # each GPU once (the book, the tick's assignment and the audit read it this way).
        await conn.execute("UPDATE leases SET reclaim_id = $2 WHERE id = ANY($1::bigint[]) AND status = 'active'"
                           " AND reclaim_id IS NULL", lease_ids, reclaim_id)
    return sorted(r["id"] for r in rows)


# Never end a lease before the time already billed (settlement may have billed a sample's coverage
# past the host's last sample, or a gang sibling's metered time past its partner's failure): what
# is billed stays billed, so the end moves no earlier than that.
# Rounded up to the microsecond, the precision of a timestamp.
_BILLED_UNTIL = ("l.start_at + make_interval(secs => (ceil(l.billed_gpu_s::numeric * 1000000 / l.gpus)"
                 " / 1000000)::float8)")


async def fail_silent_hosts(conn: asyncpg.Connection, now: datetime, *, grace_s: float, fail_s: float) -> int:
    """A host whose agent is silent past `grace_s` is marked silent (billing already stops at its
    last sample, and the book offers nothing on it); past `fail_s` its live leases fail at its last
    sample, with no charge for the unmetered time, and the other leases of their gangs end with them
    (a gang is useless without a member). Leases that ran out before are ended as due first, so a
    failure never rewrites a lease that had already ended. Returns the leases that failed."""
    async with conn.transaction():
        await lock_lease_changes(conn, now)
        await end_due(conn, now)
        await conn.execute(
            "UPDATE hosts SET health = 'silent' WHERE health = 'ok' AND last_sample_at < $1",
            now - timedelta(seconds=grace_s))
        failed_hosts = [r["id"] for r in await conn.fetch(
            "UPDATE hosts h SET health = 'failed' WHERE health <> 'failed' AND EXISTS (SELECT 1 FROM leases l"
            " WHERE l.host_id = h.id AND l.status = ANY($2::text[])"
            " AND coalesce(h.last_sample_at, l.start_at) < $1) RETURNING id",
            now - timedelta(seconds=fail_s), list(map(str, LIVE)))]
        status, reason = TRANSITIONS[(LeaseStatus.ACTIVE, LeaseEvent.HOST_FAILED)]
        # Also leases on hosts already failed (a lease may have started before the host was marked).
        rows = await conn.fetch(
            "UPDATE leases l SET status = $3, end_reason = $4,"
            f" end_at = least(greatest(coalesce(h.last_sample_at, l.start_at), l.start_at, {_BILLED_UNTIL}),"
            "   coalesce(l.end_at, l.planned_end_at))"
            " FROM hosts h WHERE h.id = l.host_id AND l.status = ANY($5::text[])"
            " AND (h.id = ANY($1::bigint[]) OR h.health = 'failed')"
            " AND coalesce(h.last_sample_at, l.start_at) < $2 RETURNING l.id, l.bid_id, l.end_at",
            failed_hosts, now - timedelta(seconds=fail_s), str(status), str(reason), sources(LeaseEvent.HOST_FAILED))
        failed = [r["id"] for r in rows]
        status, reason = TRANSITIONS[(LeaseStatus.ACTIVE, LeaseEvent.GANG_FAILED)]
        siblings = await conn.fetch(
            "UPDATE leases l SET status = $3, end_reason = $4,"
            f" end_at = least(coalesce(l.end_at, l.planned_end_at), greatest(l.start_at, f.end_at, {_BILLED_UNTIL}))"
            " FROM (SELECT bid_id, min(end_at) AS end_at FROM leases WHERE id = ANY($1::bigint[]) GROUP BY bid_id) f"
            " WHERE l.bid_id = f.bid_id AND l.status = ANY($2::text[]) RETURNING l.id",
            failed, sources(LeaseEvent.GANG_FAILED), str(status), str(reason))
        await _release_gpus(conn, failed + [r["id"] for r in siblings])
    return len(failed)
