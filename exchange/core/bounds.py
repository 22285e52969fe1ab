"""The ranges every value from the wire must fit before it reaches the database or any arithmetic.

PostgreSQL's bigint holds 64-bit signed integers and Python's int holds any; a request naming id
2**64, a cursor of 30 digits or a meter `seq` past bigint would otherwise fail inside asyncpg and
answer 500. Every id, sequence number, cursor and stored count from the wire is one of the types
below, so it is refused at the boundary with a 4xx naming the field. Text patterns are matched
whole: Python's `$` also matches before a trailing newline ("2.5\n"), hence `(?!\\n)$`, which reads
the same in JSON Schema (ECMA-262) as in Python, so /schema documents exactly what is accepted."""
from __future__ import annotations

import re
from datetime import datetime, timezone
from typing import Annotated

import msgspec
from litestar.params import Parameter

from exchange.core.errors import InvalidField

BIGINT_MAX = 2**63 - 1  # PostgreSQL bigint
INT_MAX = 2**31 - 1  # PostgreSQL int

# The end of the text, not the end of a line: Python's `$` alone accepts one trailing "\n".
END = r"(?!\n)$"


def whole(body: str) -> str:
    """A pattern that must match the whole text (in Python and in JSON Schema alike)."""
    return f"^(?:{body}){END}"


# Printable text (no control characters: PostgreSQL's text cannot hold NUL, and a key with a
# newline or an escape sequence is never what a client meant).
PLAIN_TEXT_PATTERN = whole(r"[^\x00-\x1f\x7f]+")

# --- body fields (msgspec) -------------------------------------------------------------------
Id = Annotated[int, msgspec.Meta(ge=1, le=BIGINT_MAX, description="an object's id (1 to 2**63-1)")]
# One below bigint's end: the server computes the successor of a sequence number (the next one it
# expects), which must fit as well.
Seq = Annotated[int, msgspec.Meta(ge=0, le=BIGINT_MAX - 1, description="a sequence number (0 to 2**63-2)")]
# A non-negative quantity stored in a bigint column (a counter, a reading); its physical bound, where
# one applies, is checked where it is known.
BigCount = Annotated[int, msgspec.Meta(ge=0, le=BIGINT_MAX)]
SmallCount = Annotated[int, msgspec.Meta(ge=0, le=INT_MAX)]
PlainText = Annotated[str, msgspec.Meta(pattern=PLAIN_TEXT_PATTERN)]

# --- path and query parameters (Litestar checks these; msgspec.Meta is not read there) -----------
PathId = Annotated[int, Parameter(ge=1, le=BIGINT_MAX, description="an object's id (1 to 2**63-1)")]

# Times on the wire: RFC 3339 with a zone, within these. Python's datetime ends at year 9999 in its
# own zone, so "9999-12-31T23:59:59-14:00" (year 10000 in UTC) could not even be converted for the
# database; the margin leaves room for any window or notice added to a time.
EARLIEST_TIME = datetime(1970, 1, 1, tzinfo=timezone.utc)
LATEST_TIME = datetime(9000, 1, 1, tzinfo=timezone.utc)


def check_time(field: str, value: datetime | None) -> None:
    """A 422 naming `field` for a time without a zone or outside EARLIEST_TIME..LATEST_TIME."""
    if value is None:
        return
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidField(field, "must be an RFC 3339 time with a zone, e.g. 2026-01-01T00:00:00Z")
    if not EARLIEST_TIME <= value <= LATEST_TIME:
        raise InvalidField(field, f"must lie between {EARLIEST_TIME.isoformat()} and {LATEST_TIME.isoformat()}")


def check_times(data: object, *fields: str) -> None:
    for field in fields:
        check_time(field, getattr(data, field))


_CURSOR = re.compile(r"[0-9]{1,19}")
# What /schema promises a cursor may be: up to 18 digits is always within bigint (19 may not be),
# so every cursor the schema allows is accepted; parse_cursor also takes 19 digits up to bigint.
CURSOR_PATTERN = r"^[0-9]{1,18}$"


def parse_cursor(cursor: str | None) -> int:
    """A page cursor (the `next` of a previous page: an id) -> the id to continue below. ASCII
    digits only (`"²".isdigit()` is True in Python, and int() reads Arabic-Indic digits) and within
    bigint; anything else is a 422 naming `cursor`."""
    if cursor is None:
        return BIGINT_MAX
    if not _CURSOR.fullmatch(cursor) or int(cursor) > BIGINT_MAX:
        raise InvalidField("cursor", "must be the `next` value of a previous page")
    return int(cursor)
