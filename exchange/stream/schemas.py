"""/v1/stream's wire shapes: the client's first message; the server sends the feed's Envelope
(exchange/feed/schemas.py: SPEC §9 gives both the same envelope)."""
from __future__ import annotations

from typing import Literal

import msgspec

from exchange.core.structs import Struct


class StreamOp(Struct, frozen=True, kw_only=True):
    """The first message when the key is not in the header: {"op":"auth","key":"gpx_…","since":n?};
    `since` replays the account's events after that seq (from 0: all of them)."""
    op: Literal["auth", "ping"]
    key: str | None = None
    since: int | None = None


op_decoder = msgspec.json.Decoder(StreamOp)
