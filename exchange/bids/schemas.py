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
# A bid's terms, named once: placing a bid (BidCreate) and quoting one (QuoteRequest) take the same
# bounds. BidCreate keeps its field order (its encoding is the idempotency fingerprint of stored bids).
GangGpus = Annotated[int, msgspec.Meta(gt=0)]
MinSurvival = Annotated[float, msgspec.Meta(ge=0, le=1)]
MinNoticeS = Annotated[int, msgspec.Meta(ge=0, le=7 * 24 * 3600)]
TimeInForce = Literal["gtc", "ioc", "gtd"]


class BidCreate(Struct, frozen=True, kw_only=True):
    market: MarketId
    gpus: GangGpus
    duration_s: int
    limit_price: Money
    client_order_id: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=PLAIN_TEXT_PATTERN)]
    min_survival: MinSurvival = 0.0
    min_notice_s: MinNoticeS = 0
    time_in_force: TimeInForce = "gtc"
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


class QuoteRequest(Struct, frozen=True, kw_only=True):
    """A bid's terms without a client_order_id: a quote places nothing, so there is nothing to
    make idempotent."""
    market: MarketId
    gpus: GangGpus
    duration_s: int
    limit_price: Money
    min_survival: MinSurvival = 0.0
    min_notice_s: MinNoticeS = 0
    time_in_force: TimeInForce = "gtc"
    expire_at: datetime | None = None
    requeue_on_preempt: bool = False


class Quote(Struct, frozen=True, kw_only=True):
    """What placing these terms now would get at the next clearing, were the book to stay as it is
    (exchange/bids/quote.py). Reasons and shortfalls mean what a resting bid's do."""
    market: str
    gpus: int
    duration_s: int
    limit_price: str
    would_fill: bool
    # Per GPU-hour: the price it would clear at (firm: for the whole lease; spot: the current spot
    # price, which later ticks move, never above limit_price). None when it would not fill.
    price: str | None
    # Free GPUs in the model's supply whose terms it fits (window, firm window, reservation,
    # notice, survival), whatever their floor and whether they sit on one host.
    eligible_gpus: int
    unfilled_reason: str | None
    unfilled_shortfall: str | None
    hold: str  # what placing the bid would hold from the balance: limit_price x gpus x duration
    available: str  # the tenant's available balance now
    at: datetime  # the moment the book was read and cleared
