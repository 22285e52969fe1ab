"""The matching benchmark runs end to end on a small book (figures are not asserted)."""

from __future__ import annotations

import numpy as np
import pytest

from loadtests.bench_matching import (
    HOUR,
    NOW,
    Market,
    _welfare_of_fills,
    format_table,
    load_book,
    milp_optimum,
    run,
)
from matching import INT64_MAX
from matching.arrays import BID_FIELDS, BLOCK_FIELDS

KEYS = {
    "full_tick_ms", "incremental_tick_ms", "orders_per_s", "reference_orders", "reference_ms",
    "engine_ms_same_book", "reference_ratio", "welfare_mean", "welfare_worst",
}


def test_bench_runs_small():
    figures = run(orders=3_000, hosts=300, welfare_instances=2, reference_sizes=(300,), repeats=1)

    assert KEYS <= set(figures)
    assert figures["reference_orders"] == 300
    assert 0.0 <= figures["welfare_worst"] <= figures["welfare_mean"] <= 1.0 + 1e-9
    assert "full tick" in format_table(figures)


def _columns(rows: list[dict], dtypes) -> dict[str, np.ndarray]:
    return {name: np.array([r[name] for r in rows], dtype) for name, dtype in dtypes}


def test_milp_optimum_holds_one_uniform_price_per_tier():
    # A (limit $10) only fits the $6 block (the $1 block's window is too short for it); B ($5)
    # fits the $1 block.  Apart, they would yield 8 x ($4 + $4) per hour; under one price, the
    # price would have to be >= $6 (A's block) and <= $5 (B's limit): only one of them can win.
    blocks = [
        {"block_id": 1, "host_id": 1, "fabric_id": 1, "host_gpus": 8, "gpus": 8, "free": 8,
         "floor": 1_000_000, "available_until": NOW + 2 * HOUR, "firm_until": 0, "notice_s": 120,
         "rate_mph": 0, "cut_at": INT64_MAX},
        {"block_id": 2, "host_id": 2, "fabric_id": 1, "host_gpus": 8, "gpus": 8, "free": 8,
         "floor": 6_000_000, "available_until": NOW + 48 * HOUR, "firm_until": 0, "notice_s": 120,
         "rate_mph": 0, "cut_at": INT64_MAX},
    ]
    spot = [
        {"bid_id": 1, "seq": 1, "gpus": 8, "duration_s": 10 * HOUR, "limit": 10_000_000,
         "hazard_budget": INT64_MAX, "min_notice_s": 0},
        {"bid_id": 2, "seq": 2, "gpus": 8, "duration_s": HOUR, "limit": 5_000_000,
         "hazard_budget": INT64_MAX, "min_notice_s": 0},
    ]
    market = Market(_columns(blocks, BLOCK_FIELDS), _columns([], BID_FIELDS),
                    _columns(spot, BID_FIELDS), {"lease_id": np.empty(0, np.int64),
                                                 "limit": np.empty(0, np.int64)})

    apart = milp_optimum(market, uniform_price=False)
    uniform = milp_optimum(market)
    engine = _welfare_of_fills(market, load_book(market).tick(NOW), per_hour=True)

    assert apart == pytest.approx(64.0)
    assert uniform == pytest.approx(32.0)
    assert engine == pytest.approx(32.0)  # A wins on block 2; B loses (limit below max_floor)
