"""/v1/stream's wire shapes: the feed's envelope (SPEC §9), with private event types."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from exchange.core.structs import Struct

EventType = Literal["fill", "lease_started", "notice", "lease_ended", "heartbeat", "error", "ready"]


class StreamOp(Struct, frozen=True, kw_only=True):
    """The first message when the key is not in the header: {"op":"auth","key":"gpx_…","since":n?};
    `since` replays the account's events after that seq (from 0: all of them)."""
    op: Literal["auth", "ping"]
    key: str | None = None
    since: int | None = None


class StreamEnvelope(msgspec.Struct, frozen=True, kw_only=True):
    channel: str
    type: EventType
    market: str | None
    seq: int | None
    ts: datetime
    data: Any


encoder = msgspec.json.Encoder()
op_decoder = msgspec.json.Decoder(StreamOp)
