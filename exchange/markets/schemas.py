from __future__ import annotations

from datetime import datetime

from exchange.core.structs import Struct

TIERS = ("spot", "firm")


class Market(Struct, frozen=True, kw_only=True):
    id: str
    model: str
    tier: str
    last_price: str | None
    indicative_price: str | None
    last_trade_at: datetime | None
