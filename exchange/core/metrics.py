"""Domain counters, exported at /metrics beside Litestar's HTTP metrics (same default registry)."""
from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

BIDS_PLACED = Counter("gpux_bids_placed_total", "Bids accepted into the book", ["market"])
BIDS_REFUSED = Counter("gpux_bids_refused_total", "Bids refused", ["reason"])
BIDS_CLOSED = Counter("gpux_bids_closed_total", "Bids that left the book", ["status"])
DEPOSITS = Counter("gpux_deposits_total", "Deposits credited")
TICKS = Counter("gpux_ticks_total", "Auction ticks run")
TICK_PERSIST_FAILURES = Counter("gpux_tick_persist_failures_total", "Model ticks whose results could not be written")
BOOK_DRIFT_BIDS = Gauge("gpux_book_drift_bids", "Bids on which the matching book and the database disagree after the"
                        " last tick (missing: open but not in the book; extra: in the book, not open)", ["kind"])
TICK_SECONDS = Histogram("gpux_tick_seconds", "Time to clear and persist one auction tick",
                         buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
FILLS = Counter("gpux_fills_total", "Leases created by matching", ["market"])
METER_SAMPLES = Counter("gpux_meter_samples_total", "Metering samples stored")
METER_REFUSED = Counter("gpux_meter_refused_total", "Metering reports refused", ["reason"])
METER_SAMPLES_REFUSED = Counter("gpux_meter_samples_refused_total",
                                "Metering samples refused at ingest for breaking the meter bounds", ["reason"])
SETTLED_MICROS = Counter("gpux_settled_micros_total", "Micro-dollars moved from tenants by settlement")
OPEN_BIDS = Gauge("gpux_open_bids", "Open bids in the book at the last tick", ["market"])
SETTLE_FAILURES = Counter("gpux_settle_failures_total",
                          "Leases whose settlement failed in a run (rolled back alone, retried next run)")
LISTENER_UP = Gauge("gpux_listener_up", "1 while this process's LISTEN connection is up, 0 while it is being"
                    " re-established (feed: market data, stream: private events)", ["listener"])
LISTENER_LOSSES = Counter("gpux_listener_losses_total", "LISTEN connections found lost (server restart, terminated"
                          " backend, failed health check)", ["listener"])
LISTENER_RECONNECTS = Counter("gpux_listener_reconnects_total", "LISTEN connections re-established after a loss"
                              " (each followed by a resync from the database)", ["listener"])
