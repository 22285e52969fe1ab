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


async def fail_silent_hosts(conn: asyncpg.Connection, now: datetime, *, grace_s: float, fail_s: float) -> int:
    """A host whose agent is silent past `grace_s` is marked silent (billing already stops at its
    last sample); past `fail_s` its live leases end as failed at its last sample, with no charge for
    the unmetered time."""
    async with conn.transaction():
        await lock_lease_changes(conn, now)
        await conn.execute(
            "UPDATE hosts SET health = 'silent' WHERE health = 'ok' AND last_sample_at < $1",
            now - timedelta(seconds=grace_s))
        failed_hosts = [r["id"] for r in await conn.fetch(
            "UPDATE hosts h SET health = 'failed' WHERE health <> 'failed' AND EXISTS (SELECT 1 FROM leases l"
            " WHERE l.host_id = h.id AND l.status IN ('active', 'ending')"
            " AND coalesce(h.last_sample_at, l.start_at) < $1) RETURNING id", now - timedelta(seconds=fail_s))]
        # Also leases on hosts already failed (a lease may have started after the host was marked).
        rows = await conn.fetch(
            "UPDATE leases l SET status = 'failed', end_reason = 'host_failed',"
            " end_at = least(greatest(coalesce(h.last_sample_at, l.start_at), l.start_at), l.planned_end_at)"
            " FROM hosts h WHERE h.id = l.host_id AND l.status IN ('active', 'ending')"
            " AND (h.id = ANY($1::bigint[]) OR h.health = 'failed')"
            " AND coalesce(h.last_sample_at, l.start_at) < $2 RETURNING l.id",
            failed_hosts, now - timedelta(seconds=fail_s))
        await _release_gpus(conn, [r["id"] for r in rows])
    return len(rows)
