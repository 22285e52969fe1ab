from __future__ import annotations

from datetime import datetime
from typing import Literal

from exchange.core.structs import Struct

LeaseStatus = Literal["active", "ending", "ended", "failed"]


class Lease(Struct, frozen=True, kw_only=True):
    id: int
    bid_id: int
    market: str
    tier: str
    host_id: int
    offer_id: int
    gpus: int
    gpu_uuids: list[str]
    price: str
    limit_price: str
    start_at: datetime
    planned_end_at: datetime
    end_at: datetime | None
    status: LeaseStatus
    end_reason: str | None
    hold: str
    # Metering and settlement (GPU-hours and kWh as decimal strings).
    metered_gpu_hours: str
    billed_gpu_hours: str
    charged: str
    fees: str
    energy_kwh: str
    settled_at: datetime | None


class LeaseList(Struct, frozen=True, kw_only=True):
    items: list[Lease]
    next: str | None
