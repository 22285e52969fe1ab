"""Reading durations and times typed on a command line: `90s`, `30m`, `4h`, `2d` or plain seconds;
an RFC 3339 time with its zone, or `+2h` from now (this machine's clock, which only shapes the
request: the exchange checks every time against its own)."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from exchange.commands.output import InputError

_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"([0-9]{1,9})([smhd]?)")


def duration_s(option: str, text: str) -> int:
    match = _DURATION.fullmatch(text.strip())
    if not match:
        raise InputError(option, f"{option}: {text!r} is not a duration like 90s, 30m, 4h, 2d or seconds")
    return int(match.group(1)) * _UNIT_S[match.group(2) or "s"]


def moment(option: str, text: str, now: datetime | None = None) -> datetime:
    text = text.strip()
    if text.startswith("+"):
        return (now or datetime.now(timezone.utc)) + timedelta(seconds=duration_s(option, text[1:]))
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InputError(option, f"{option}: {text!r} is not an RFC 3339 time or +DURATION") from None
    if value.tzinfo is None:
        raise InputError(option, f"{option}: {text!r} has no time zone (add Z or +00:00)")
    return value
