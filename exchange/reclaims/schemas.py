from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from exchange.accounts.schemas import IdempotencyKey
from exchange.core.bounds import Id
from exchange.core.structs import Struct
from exchange.hosts.schemas import GpuModel


class ReclaimCreate(Struct, frozen=True, kw_only=True):
    model: GpuModel
    gpus: Annotated[int, msgspec.Meta(gt=0, le=100_000)]
    host_id: Id | None = None
    at: datetime | None = None
    until: datetime | None = None
    strategy: str | None = None
    # Optional, scoped to the owner: a retry with the same key and body is the same reclaim (no
    # second effect); the same key with another body is refused with 409 idempotency_conflict.
    idempotency_key: IdempotencyKey | None = None


class ReclaimedLease(Struct, frozen=True, kw_only=True):
    id: int
    host_id: int
    gpus: int
    end_at: datetime
    free_of_charge: bool


class Reclaim(Struct, frozen=True, kw_only=True):
    id: int
    model: str
    gpus: int
    host_id: int | None
    at: datetime
    until: datetime | None
    status: str
    strategy: str
    taken_free: int
    shortfall: int
    leases: list[ReclaimedLease]
    idempotency_key: str | None = None
    created_at: datetime


class ReclaimList(Struct, frozen=True, kw_only=True):
    items: list[Reclaim]
