"""The matching benchmark runs end to end on a small book (figures are not asserted)."""

from __future__ import annotations

from loadtests.bench_matching import format_table, run

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
