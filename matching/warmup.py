"""Compile every kernel before the first real tick (numba compiles lazily, on first call).

With `cache=True` the machine code is also stored next to the sources, so later processes only
load it; either way the cost is paid here, at service start-up, and never inside a tick.
"""

from __future__ import annotations

import numpy as np

from matching.arrays import INT64_MAX, Tier
from matching.book import ModelBook


def warm_up() -> None:
    """Run a tiny book through every code path: both tiers, a multi-host gang, pending bids,
    cancels, compaction, block updates and removals."""
    now = 1_000_000
    hour = 3600
    n = 6
    book = ModelBook()
    book.upsert_blocks(
        np.arange(1, n + 1), np.arange(1, n + 1), np.array([1, 1, 1, 2, 2, 2]),
        np.full(n, 8), np.array([8, 8, 8, 8, 4, 8]), np.array([8, 8, 8, 8, 4, 6]),
        np.arange(n) * 100_000 + 1_000_000, np.full(n, now + 48 * hour),
        np.array([now + 10 * hour, 0, now + 10 * hour, 0, now + 10 * hour, 0]),
        np.full(n, 120), np.full(n, 50), np.full(n, INT64_MAX),
    )
    for tier in (Tier.FIRM, Tier.SPOT):
        book.add_bids(
            tier, np.arange(10, 16) + 100 * int(tier), np.arange(10, 16),
            np.array([1, 2, 16, 4, 8, 64]), np.full(6, hour), np.arange(6) * 500_000 + 1_500_000,
            np.full(6, INT64_MAX), np.zeros(6),
        )
    book.set_incumbents(np.array([7, 3]), np.array([2_000_000, 9_000_000]))
    book.eligible_free(Tier.SPOT, now, hour, 60, 1000)  # a quote's count (exchange/bids/quote.py)
    book.tick(now)
    book.remove_bids(Tier.SPOT, np.array([110]))
    book.add_bids(Tier.SPOT, np.array([300]), np.array([50]), np.array([2]), np.array([hour]),
                  np.array([3_000_000]), np.array([1000]), np.array([60]))
    book.upsert_blocks(
        np.array([2]), np.array([2]), np.array([1]), np.array([8]), np.array([8]), np.array([8]),
        np.array([1_100_000]), np.array([now + 48 * hour]), np.array([0]), np.array([120]),
        np.array([50]), np.array([now + 5 * hour]),
    )
    book.tick(now + 2)
    book.compact()
    book.remove_blocks(np.array([3]))
    book.tick(now + 4)
    # A change of `free` alone is patched into the index in place.
    book.upsert_blocks(
        np.array([4]), np.array([4]), np.array([2]), np.array([8]), np.array([8]), np.array([3]),
        np.array([1_300_000]), np.array([now + 48 * hour]), np.array([0]), np.array([120]),
        np.array([50]), np.array([INT64_MAX]),
    )
    book.tick(now + 6)
