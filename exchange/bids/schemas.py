from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from exchange.accounts.schemas import Money
from exchange.core.bounds import PLAIN_TEXT_PATTERN, whole
from exchange.core.structs import Struct

MarketId = Annotated[str, msgspec.Meta(max_length=80, pattern=whole(r"[A-Za-z0-9][A-Za-z0-9.-]*/(spot|firm)"),
                                       description="GPU model and tier, e.g. H100-80GB/spot")]
BidStatus = Literal["open", "filled", "cancelled", "expired"]


class BidCreate(Struct, frozen=True, kw_only=True):
    market: MarketId
    gpus: Annotated[int, msgspec.Meta(gt=0)]
    duration_s: int
    limit_price: Money
    client_order_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=PLAIN_TEXT_PATTERN)]
    min_survival: Annotated[float, msgspec.Meta(ge=0, le=1)] = 0.0
    min_notice_s: Annotated[int, msgspec.Meta(ge=0, le=7 * 24 * 3600)] = 0
    time_in_force: Literal["gtc", "ioc", "gtd"] = "gtc"
    expire_at: datetime | None = None
    requeue_on_preempt: bool = False


class Bid(Struct, frozen=True, kw_only=True):
    id: int
    market: str
    gpus: int
    duration_s: int
    limit_price: str
    client_order_id: str
    min_survival: float
    min_notice_s: int
    time_in_force: str
    expire_at: datetime | None
    requeue_on_preempt: bool
    status: BidStatus
    hold: str
    unfilled_reason: str | None
    unfilled_shortfall: str | None
    created_at: datetime
    updated_at: datetime


class BidList(Struct, frozen=True, kw_only=True):
    items: list[Bid]
    next: str | None


class BidCost(Struct, frozen=True, kw_only=True):
    bid_id: int
    leases: int
    preemptions: int
    billed_gpu_hours: str
    charged: str
