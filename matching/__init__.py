"""Numba matching engine of gpu-exchange: pure functions over numpy arrays, no I/O.

The clearing rule is docs/matching.md.  One `ModelBook` per GPU model, kept between ticks:

    book = ModelBook()
    book.upsert_blocks(block_id, host_id, fabric_id, host_gpus, gpus, free, floor,
                       available_until, firm_until, notice_s, rate_mph, cut_at)
    book.add_bids(Tier.SPOT, bid_id, seq, gpus, duration_s, limit, hazard_budget, min_notice_s)
    result = book.tick(now)          # ModelTickResult(firm=TickResult, spot=TickResult)

`reference_tick` is the slow plain-Python statement of the same rule, used to check the engine.
"""

from matching.arrays import INT64_MAX, Tier
from matching.book import ModelBook, ModelTickResult, TickResult
from matching.reasons import Reason
from matching.reference import ReferenceResult, reference_tick
from matching.units import hazard_budget_from_survival, rate_mph_from_per_hour
from matching.warmup import warm_up

__all__ = [
    "INT64_MAX",
    "ModelBook",
    "ModelTickResult",
    "Reason",
    "ReferenceResult",
    "TickResult",
    "Tier",
    "hazard_budget_from_survival",
    "rate_mph_from_per_hour",
    "reference_tick",
    "warm_up",
]
