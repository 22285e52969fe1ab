"""The feed's wire shapes (SPEC §9): the client's ops and the server's envelopes."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

CHANNELS = ("ticker", "book", "trades", "candles")
Channel = Literal["ticker", "book", "trades", "candles"]
# The one channel of Litestar's channels plugin that carries every market's updates between processes.
FEED_CHANNEL = "gpux_feed"
# PostgreSQL's NOTIFY payload limit is 8000 bytes; updates are split to stay well below it.
MAX_PAYLOAD = 7000


class FeedOp(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """{"op":"subscribe","channels":["book",...],"markets":["H100-80GB/spot"]}; also "unsubscribe",
    and "ping" (answered with a heartbeat)."""
    op: Literal["subscribe", "unsubscribe", "ping"]
    channels: list[str] = []
    markets: list[str] = []


class Envelope(msgspec.Struct, frozen=True, kw_only=True):
    """Every server message of /v1/feed and /v1/stream (SPEC §9: the same envelope). On the feed `seq`
    rises by one per market and channel; on the stream, by one per account. None on heartbeats and
    errors."""
    channel: str
    type: Literal["snapshot", "update", "heartbeat", "error",
                  "ready", "fill", "lease_started", "notice", "lease_ended", "ping"]
    market: str | None
    seq: int | None
    ts: datetime
    data: Any


encoder = msgspec.json.Encoder()
envelope_decoder = msgspec.json.Decoder(Envelope)
op_decoder = msgspec.json.Decoder(FeedOp)
