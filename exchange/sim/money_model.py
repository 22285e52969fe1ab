"""The simulation's own arithmetic of money, written from the SPEC and not from the product's code
(nothing here imports exchange.settlement, exchange.ledger or exchange.core.money): the auditor
compares what the exchange stored with what these functions say it must be.

- A price or amount on the wire is a decimal string with at most 6 decimals: micro-dollars inside.
- A bid holds limit x GPUs x duration, rounded up to the micro-dollar (prices are per GPU-hour).
- A fill narrows the hold to what its leases can cost: a firm lease its cleared price for the whole
  duration, a spot lease its limit (the spot price may rise to it), split over the gang's leases."""
from __future__ import annotations

MICROS_PER_DOLLAR = 1_000_000
SECONDS_PER_HOUR = 3600
BPS = 10_000


def micros(text: str) -> int:
    """'12.5' -> 12_500_000. The workload writes only well-formed, non-negative amounts."""
    whole, _, fraction = text.partition(".")
    assert whole.isdigit() and (fraction == "" or (fraction.isdigit() and len(fraction) <= 6)), text
    return int(whole) * MICROS_PER_DOLLAR + int(fraction.ljust(6, "0") or "0")


def cost_rounded_up(price_micros_per_h: int, gpus: int, seconds: int) -> int:
    numerator = price_micros_per_h * gpus * seconds
    return (numerator + SECONDS_PER_HOUR - 1) // SECONDS_PER_HOUR


def bid_hold_micros(body: dict) -> int:
    """What an open bid with these terms holds."""
    return cost_rounded_up(micros(body["limit_price"]), body["gpus"], body["duration_s"])


def fill_hold_micros(body: dict, tier: str, price_micros_per_h: int) -> int:
    """What a bid's leases hold together right after it fills at `price_micros_per_h`."""
    rate = price_micros_per_h if tier == "firm" else micros(body["limit_price"])
    return cost_rounded_up(rate, body["gpus"], body["duration_s"])


def fee_micros(billed_micros: int, fee_bps: int) -> int:
    return billed_micros * fee_bps // BPS
