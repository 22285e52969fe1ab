"""Time as the host agent puts it on the wire and reads it back.

The wire shapes themselves are the exchange's own structs (exchange/*/schemas.py), sent and read
through the Python client (exchange/client): the agent protocol is written once. What stays here
is the agent's side of time: its clock gives epoch seconds, the structs carry datetimes.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

__all__ = ["as_sent", "epoch_s", "format_rfc3339", "parse_rfc3339", "utc"]


def utc(epoch_s: float) -> datetime:
    """Epoch seconds -> an aware UTC datetime (what the exchange's structs carry)."""
    return datetime.fromtimestamp(epoch_s, UTC)


def epoch_s(moment: datetime) -> float:
    """A datetime from the exchange -> epoch seconds; a naive one is taken as UTC, not local time."""
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def as_sent(moment: datetime) -> str:
    """A datetime spelled exactly as the exchange spells it (msgspec's RFC 3339): a notice repeats
    the exchange's end time verbatim, so a reader comparing the two sees the same text."""
    return msgspec.json.encode(moment).decode()[1:-1]


def format_rfc3339(epoch_s: float) -> str:
    """Epoch seconds -> RFC 3339 UTC with microseconds and a ``Z`` suffix (the agent's own files)."""
    return utc(epoch_s).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    """RFC 3339 (``Z`` or an offset; a naive time is taken as UTC) -> epoch seconds."""
    return epoch_s(datetime.fromisoformat(text))
