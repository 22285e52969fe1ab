"""The bid lifecycle: the one module that writes a bid's status (as the lease lifecycle does for
leases). Holds move with the status, in the caller's transaction, through the ledger.

    open --fill--> filled --requeue--> open     (a preempted lease's bid, requeue_on_preempt)
    open --cancel--> cancelled
    open --expire--> expired
"""
from __future__ import annotations

from datetime import datetime
from enum import StrEnum

import asyncpg


class BidStatus(StrEnum):
    OPEN = "open"
    FILLED = "filled"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


class BidEvent(StrEnum):
    FILL = "fill"
    CANCEL = "cancel"
    EXPIRE = "expire"
    REQUEUE = "requeue"


TRANSITIONS: dict[tuple[BidStatus, BidEvent], BidStatus] = {
    (BidStatus.OPEN, BidEvent.FILL): BidStatus.FILLED,
    (BidStatus.OPEN, BidEvent.CANCEL): BidStatus.CANCELLED,
    (BidStatus.OPEN, BidEvent.EXPIRE): BidStatus.EXPIRED,
    (BidStatus.FILLED, BidEvent.REQUEUE): BidStatus.OPEN,
}


def transition(status: BidStatus | str, event: BidEvent) -> BidStatus | None:
    return TRANSITIONS.get((BidStatus(status), event))


def _gate(event: BidEvent) -> tuple[str, str]:
    (source, target), = [(str(s), str(t)) for (s, e), t in TRANSITIONS.items() if e == event]
    return source, target


async def apply(conn: asyncpg.Connection, bid_id: int, event: BidEvent, now: datetime, *,
                hold_amount: int = 0) -> bool:
    """Move the bid by `event` if its status allows it; its hold becomes `hold_amount` (0 once it
    leaves the book). Returns whether it moved. A fill also clears the unfilled reason; a requeue
    too (the bid is judged afresh in the book)."""
    source, target = _gate(event)
    clear_reason = event in (BidEvent.FILL, BidEvent.REQUEUE)
    status = await conn.execute(
        "UPDATE bids SET status = $3, hold_amount = $4, updated_at = $5,"
        " filled_at = CASE WHEN $6 THEN $5 ELSE filled_at END,"
        " unfilled_reason = CASE WHEN $7 THEN NULL ELSE unfilled_reason END,"
        " unfilled_shortfall = CASE WHEN $7 THEN NULL ELSE unfilled_shortfall END"
        " WHERE id = $1 AND status = $2", bid_id, source, target, hold_amount, now, event == BidEvent.FILL,
        clear_reason)
    return status.endswith(" 1")
