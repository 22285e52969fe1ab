"""The arithmetic of settlement, with no I/O: what one settlement run bills a lease, given its
running totals and the GPU-seconds metered since the last run.

Every amount is derived from running totals, never accumulated increment by increment, so rounding
never builds up across runs and settling in k increments lands on exactly the totals of settling
once:

- `value` is the running sum of price × GPU-seconds (micro-dollars per GPU-hour × seconds);
- billed = floor(value / 3600) micro-dollars, capped by what the lease's hold can still cover;
- fees = floor(billed × fee_bps / 10 000): the fee of one run is that minus the fees already taken
  (flooring each run's fee instead would under-collect by up to a micro-dollar per run).

A lease reclaimed within its owner's free window (`free_of_charge`) costs its tenant nothing: what
it was billed, fee included, is refunded to its hold, and it is billed at price 0 from then on.
"""
from __future__ import annotations

from dataclasses import dataclass

from exchange.core.money import SECONDS_PER_HOUR

BPS = 10_000


@dataclass(frozen=True, slots=True)
class LeaseBill:
    """A lease's settlement totals (the `leases` columns of the same meaning)."""
    billed_gpu_s: int = 0
    value: int = 0            # Σ price_micros_per_h × GPU-s (column billed_value)
    billed_micros: int = 0    # moved from the tenant's hold so far (column billed_amount)
    fees_micros: int = 0      # of which went to the exchange (column fees_amount)
    hold_micros: int = 0      # what the lease still reserves of the tenant's held book (column hold_amount)


@dataclass(frozen=True, slots=True)
class Bill:
    """One run's outcome: the new totals and the money to move."""
    totals: LeaseBill
    charge_micros: int        # tenant held -> owner (charge - fee) + fees book (fee)
    fee_micros: int
    refund_micros: int        # free of charge: owner (refund - refund_fee) + fees book (refund_fee) -> tenant held
    refund_fee_micros: int
    release_micros: int       # closing: what is left of the hold, tenant held -> tenant available


def fees_on(billed_micros: int, fee_bps: int) -> int:
    """The exchange's fee on a lease's whole bill so far."""
    return billed_micros * fee_bps // BPS


def price_in_force(*, tier: str, cleared_micros_per_h: int, spot_micros_per_h: int | None,
                   floor_micros_per_h: int, limit_micros_per_h: int) -> int:
    """A firm lease pays its cleared price; a spot lease the market's spot price (its own cleared
    price when the market has none), clamped to [its floor, its limit]: an owner never receives
    below its floor, a tenant never pays above its limit."""
    if tier != "spot":
        return cleared_micros_per_h
    spot = cleared_micros_per_h if spot_micros_per_h is None else spot_micros_per_h
    return min(max(spot, floor_micros_per_h), limit_micros_per_h)


def wall_clock_gpu_s(window_s: float, gpus: int) -> int:
    """floor(seconds × GPUs), not floor(seconds) × GPUs: a lease ending at a fractional second (a
    failed host's last sample) would otherwise cap below what was already billed."""
    return max(0, int(window_s * gpus))


def metered_gpu_s(*, covered_gpu_s: int, wall_clock: int, billed_gpu_s: int) -> int:
    """Metered time never exceeds the wall clock and never goes down: what is billed stays billed."""
    return max(min(covered_gpu_s, wall_clock), billed_gpu_s)


def bill(prev: LeaseBill, *, delta_gpu_s: int, price_micros_per_h: int, fee_bps: int, free_of_charge: bool,
         closing: bool = False) -> Bill:
    """Bill `delta_gpu_s` more GPU-seconds at `price_micros_per_h`; with `closing`, release what is
    left of the hold. Amounts are never negative and the charge never exceeds the hold."""
    if delta_gpu_s < 0 or price_micros_per_h < 0 or not 0 <= fee_bps <= BPS:
        raise ValueError(f"bad bill: delta {delta_gpu_s} GPU-s, price {price_micros_per_h}, fee {fee_bps} bps")
    refund = refund_fee = 0
    if free_of_charge:
        # The reclaim costs the owner, not the tenant: everything billed goes back to the hold.
        refund, refund_fee = prev.billed_micros, prev.fees_micros
        prev = LeaseBill(billed_gpu_s=prev.billed_gpu_s, hold_micros=prev.hold_micros + refund)
        price_micros_per_h = 0
    value = prev.value + price_micros_per_h * delta_gpu_s
    # A hold always covers its lease's cost (it is rounded up), so the cap is a guard, not a policy.
    charge = max(0, min(value // SECONDS_PER_HOUR - prev.billed_micros, prev.hold_micros))
    billed = prev.billed_micros + charge
    # The fee on the running total; clamped to [0, charge] so a fee rate changed between runs never
    # takes back a fee already collected nor takes more than this run's charge.
    fee = min(max(0, fees_on(billed, fee_bps) - prev.fees_micros), charge)
    hold = prev.hold_micros - charge
    release = hold if closing else 0
    totals = LeaseBill(billed_gpu_s=prev.billed_gpu_s + delta_gpu_s, value=value, billed_micros=billed,
                       fees_micros=prev.fees_micros + fee, hold_micros=hold - release)
    return Bill(totals=totals, charge_micros=charge, fee_micros=fee, refund_micros=refund,
                refund_fee_micros=refund_fee, release_micros=release)
