from __future__ import annotations

from datetime import datetime
from typing import Literal

from exchange.core.structs import Struct

TIERS = ("spot", "firm")
Interval = Literal["1m", "5m", "1h"]
INTERVAL_SECONDS: dict[str, int] = {"1m": 60, "5m": 300, "1h": 3600}


class Market(Struct, frozen=True, kw_only=True):
    id: str
    model: str
    tier: str
    last_price: str | None
    indicative_price: str | None
    last_trade_at: datetime | None


class Level(Struct, frozen=True, kw_only=True):
    """One price level of the L2 book: a price (USD per GPU-hour) and the GPUs at it. In a feed
    update, `gpus == 0` removes the level."""
    price: str
    gpus: int


class Book(Struct, frozen=True, kw_only=True):
    """The L2 book as of the last auction tick: bids (open bids by limit, best first) and asks (free
    GPUs of live offers by floor, best first), with the feed's sequence number for this book."""
    market: str
    seq: int
    at: datetime | None
    bids: list[Level]
    asks: list[Level]


class RiskIndex(Struct, frozen=True, kw_only=True):
    """Reclaim risk of a market over a trailing window (see README, Market data)."""
    market: str
    window_h: int
    # Share of the spot GPU-hours bought in the window that preemption took back (0..1).
    preempted_share: float
    # Preemptions per lease-hour of spot exposure in the window: survival over d hours ~ exp(-h*d).
    hazard_per_h: float
    survival_1h: float
    preemptions: int
    spot_gpu_hours: float
    # The owners' own forecast: GPU-weighted mean reclaim_rate_per_h of the live offers.
    forecast_hazard_per_h: float


class Ticker(Struct, frozen=True, kw_only=True):
    market: str
    last: str | None
    indicative: str | None
    best_bid: str | None
    best_ask: str | None
    volume_24h_gpu_h: float
    trades_24h: int
    high_24h: str | None
    low_24h: str | None
    change_24h: str | None
    change_24h_pct: float | None
    open_bids: int
    last_trade_at: datetime | None
    risk: RiskIndex
    # Utilisation now, the number an owner looks for first. gpus_leased: GPUs held by this market's
    # live leases. gpus_offered: those plus the free GPUs its book offers now (the ask depth), so
    # offered - leased is what can still be bought here. The two tiers share the hosts: a GPU leased
    # in firm is in neither figure of spot, and a free GPU of an open firm window is in both markets'.
    gpus_offered: int = 0
    gpus_leased: int = 0
    seq: int = 0
    at: datetime | None = None


class Trade(Struct, frozen=True, kw_only=True):
    id: int
    price: str
    gpus: int
    duration_s: int
    gpu_hours: float
    at: datetime


class Preemption(Struct, frozen=True, kw_only=True):
    id: int
    lease_id: int
    gpus: int
    reason: str
    at: datetime
    ends_at: datetime | None


class TradeList(Struct, frozen=True, kw_only=True):
    market: str
    items: list[Trade]
    preemptions: list[Preemption]


class Candle(Struct, frozen=True, kw_only=True):
    """OHLC of the clearing prices traded in [t, t + interval), volume in GPU-hours bought."""
    t: datetime
    open: str
    high: str
    low: str
    close: str
    volume_gpu_h: float
    trades: int


class CandleList(Struct, frozen=True, kw_only=True):
    market: str
    interval: str
    items: list[Candle]
