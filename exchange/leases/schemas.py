from __future__ import annotations

from datetime import datetime
from typing import Literal

from exchange.core.structs import Struct

LeaseStatus = Literal["active", "ending", "ended", "failed"]


class OwnerLease(Struct, frozen=True, kw_only=True):
    """A lease as the owner of its host and the host's agent see it. A counterparty never learns the
    other side's limit: no tenant limit price, hold or bid id (what the tenant reserved tells its
    limit), only the price the lease trades at and what it was billed."""
    id: int
    market: str
    tier: str
    host_id: int
    offer_id: int
    gpus: int
    gpu_uuids: list[str]
    price: str
    start_at: datetime
    planned_end_at: datetime
    end_at: datetime | None
    status: LeaseStatus
    end_reason: str | None
    metered_gpu_hours: str
    billed_gpu_hours: str
    charged: str
    fees: str
    energy_kwh: str
    settled_at: datetime | None


class Lease(OwnerLease, frozen=True, kw_only=True):
    """A lease as its tenant (and the admin) sees it: the owner's view plus the tenant's bid, limit
    and hold."""
    bid_id: int
    limit_price: str
    hold: str


class LeaseList(Struct, frozen=True, kw_only=True):
    items: list[Lease]
    next: str | None


class OwnerLeaseList(Struct, frozen=True, kw_only=True):
    items: list[OwnerLease]
    next: str | None
