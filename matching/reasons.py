"""Why a bid did not fill: one code per losing bid (docs/matching.md, "Unfilled reasons").

The numeric values are part of the contract (they are hashed into the tick's state hash and
stored by the service), so never renumber them; append new codes at the end.
"""

from __future__ import annotations

from enum import IntEnum


class Reason(IntEnum):
    """Unfilled reasons, in the order in which the rule tests them (the first that applies wins)."""

    NO_SUPPLY_WINDOW = 1
    NO_FIRM_WINDOW = 2
    RESERVATION = 3
    NOTICE_TOO_LONG = 4
    SURVIVAL_TOO_HIGH = 5
    TOO_LARGE = 6
    LIMIT_BELOW_PRICE = 7
    BELOW_FLOOR = 8
    NO_CAPACITY = 9
