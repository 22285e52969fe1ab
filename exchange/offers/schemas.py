from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from exchange.accounts.schemas import Money
from exchange.core.bounds import Id
from exchange.core.structs import Struct
from exchange.hosts.schemas import GpuModel


class OfferCreate(Struct, frozen=True, kw_only=True):
    host_id: Id
    gpus: Annotated[int, msgspec.Meta(gt=0, le=1024)]
    floor_price: Money
    available_until: datetime
    available_from: datetime | None = None
    firm_until: datetime | None = None
    reclaim_notice_s: Annotated[int, msgspec.Meta(ge=0, le=7 * 24 * 3600)] = 120
    reclaim_rate_per_h: Annotated[float, msgspec.Meta(ge=0, le=1000)] = 0.0
    model: GpuModel | None = None


class Offer(Struct, frozen=True, kw_only=True):
    id: int
    host_id: int
    model: str
    gpus: int
    floor_price: str
    available_from: datetime
    available_until: datetime
    firm_until: datetime | None
    reclaim_notice_s: int
    reclaim_rate_per_h: float
    status: str
    created_at: datetime


class OfferList(Struct, frozen=True, kw_only=True):
    items: list[Offer]
