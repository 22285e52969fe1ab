"""Conversions from user-facing numbers to the integer units the engine works in.

The service converts once, when a bid or an offer enters the system, so that the engine and the
reference compare integers only and can never disagree through floating-point rounding.
"""

from __future__ import annotations

import math

from matching.arrays import INT64_MAX

# hazard_budget is -ln(min_survival) in "thousandths per hour x seconds": rate_mph * seconds
# compares with it directly (1 per hour = 1000 mph, 1 hour = 3600 s).
HAZARD_SCALE = 3_600_000


def hazard_budget_from_survival(min_survival: float) -> int:
    """Integer exposure budget of a bid: floor(-ln(min_survival) * 3_600_000).

    A block passes the survival test when `rate_mph * exposure_s <= budget`, which is
    `exp(-rate_per_h * hours) >= min_survival` evaluated exactly in integers.
    `min_survival <= 0` accepts any hazard (INT64_MAX); `min_survival == 1` accepts none (0).
    """
    if math.isnan(min_survival) or min_survival > 1.0:
        raise ValueError(f"min_survival must be in [0, 1], got {min_survival!r}")
    if min_survival <= 0.0:
        return INT64_MAX
    budget = math.floor(-math.log(min_survival) * HAZARD_SCALE)
    return max(0, min(budget, INT64_MAX))


def rate_mph_from_per_hour(rate: float) -> int:
    """Reclaim hazard per hour (the owner's `reclaim_rate_per_h`) in thousandths per hour."""
    if math.isnan(rate) or rate < 0.0:
        raise ValueError(f"reclaim rate must be >= 0, got {rate!r}")
    return int(round(rate * 1000.0))
