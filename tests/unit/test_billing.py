"""The settlement arithmetic on its own (exchange/settlement/billing.py): exact running-sum billing,
the fee on the running total, the hold cap, free-of-charge refunds, and k runs == one run."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from exchange.settlement.billing import Bill, LeaseBill, bill, fees_on, price_in_force

prices = st.integers(min_value=0, max_value=100_000_000)          # up to 100 $/GPU-h
deltas = st.integers(min_value=0, max_value=8 * 86_400)          # up to 8 GPUs for a day
bps = st.integers(min_value=0, max_value=10_000)
holds = st.integers(min_value=0, max_value=10**13)
runs = st.lists(deltas, min_size=1, max_size=12)


def _run(prev: LeaseBill, delta_list: list[int], *, price: int, fee_bps: int, free: bool = False) -> list[Bill]:
    bills = []
    for delta in delta_list:
        b = bill(prev, delta_gpu_s=delta, price_micros_per_h=price, fee_bps=fee_bps, free_of_charge=free)
        bills.append(b)
        prev = b.totals
    return bills


def _non_negative(b: Bill) -> bool:
    t = b.totals
    return min(b.charge_micros, b.fee_micros, b.refund_micros, b.refund_fee_micros, b.release_micros,
               t.billed_gpu_s, t.value, t.billed_micros, t.fees_micros, t.hold_micros) >= 0


@given(runs, prices, bps)
def test_every_step_bills_floor_of_value_and_fees_on_the_running_total(delta_list, price, fee_bps) -> None:
    # A hold that covers everything: billed is exactly floor(value / 3600) at every step.
    prev = LeaseBill(hold_micros=10**15)
    for b in _run(prev, delta_list, price=price, fee_bps=fee_bps):
        t = b.totals
        assert t.billed_micros == t.value // 3600
        assert t.fees_micros == fees_on(t.billed_micros, fee_bps) == t.billed_micros * fee_bps // 10_000
        assert 0 <= b.fee_micros <= b.charge_micros and _non_negative(b)


@given(runs, prices, bps, holds)
def test_the_charge_never_exceeds_the_hold_and_money_is_conserved(delta_list, price, fee_bps, hold) -> None:
    prev = LeaseBill(hold_micros=hold)
    for b in _run(prev, delta_list, price=price, fee_bps=fee_bps):
        assert b.charge_micros <= prev.hold_micros
        assert b.totals.hold_micros == prev.hold_micros - b.charge_micros
        assert b.totals.billed_micros == prev.billed_micros + b.charge_micros
        # Billed up to what the value asks, unless the hold ran out.
        assert b.totals.billed_micros == min(b.totals.value // 3600, hold)
        assert _non_negative(b)
        prev = b.totals


@given(runs, prices, bps, holds)
def test_settling_in_k_increments_equals_settling_once(delta_list, price, fee_bps, hold) -> None:
    start = LeaseBill(hold_micros=hold)
    many = _run(start, delta_list, price=price, fee_bps=fee_bps)
    once = bill(start, delta_gpu_s=sum(delta_list), price_micros_per_h=price, fee_bps=fee_bps, free_of_charge=False)
    assert many[-1].totals == once.totals
    assert sum(b.charge_micros for b in many) == once.charge_micros
    assert sum(b.fee_micros for b in many) == once.fee_micros


def test_an_uneven_price_settled_second_by_second_bills_like_one_settlement() -> None:
    # 1.234567 $/h over 1000 one-second runs, 1% fee: floor(1 234 567 000 / 3600) = 342 935 billed and
    # a fee of floor(3 429.35) = 3 429. A fee floored per run (342 or 343 each: 3 each) took 3 000.
    bills = _run(LeaseBill(hold_micros=10**9), [1] * 1000, price=1_234_567, fee_bps=100)
    assert bills[-1].totals.billed_micros == 342_935
    assert bills[-1].totals.fees_micros == 3_429 == sum(b.fee_micros for b in bills)


@given(runs, prices, bps, holds, st.integers(min_value=1, max_value=11))
def test_free_of_charge_refunds_exactly_what_was_billed_fee_included(delta_list, price, fee_bps, hold, cut) -> None:
    start = LeaseBill(hold_micros=hold)
    billed = _run(start, delta_list[:cut], price=price, fee_bps=fee_bps)[-1].totals
    free = _run(billed, delta_list[cut:] or [0], price=price, fee_bps=fee_bps, free=True)

    first = free[0]
    assert (first.refund_micros, first.refund_fee_micros) == (billed.billed_micros, billed.fees_micros)
    end = free[-1].totals
    assert (end.billed_micros, end.fees_micros, end.value) == (0, 0, 0)
    assert end.hold_micros == hold  # the hold is whole again: closing releases all of it
    assert sum(b.refund_micros for b in free) == billed.billed_micros  # refunded once, not per run
    assert all(b.charge_micros == 0 and _non_negative(b) for b in free)


@given(runs, prices, bps, holds)
def test_closing_releases_what_is_left_of_the_hold(delta_list, price, fee_bps, hold) -> None:
    *body, last = delta_list
    prev = _run(LeaseBill(hold_micros=hold), body or [0], price=price, fee_bps=fee_bps)[-1].totals
    b = bill(prev, delta_gpu_s=last, price_micros_per_h=price, fee_bps=fee_bps, free_of_charge=False, closing=True)
    assert b.totals.hold_micros == 0
    assert b.charge_micros + b.release_micros == prev.hold_micros
    assert b.totals.billed_micros + b.release_micros == hold  # the whole hold is accounted for


@settings(max_examples=50)
@given(st.integers(min_value=0, max_value=10**12), bps, bps)
def test_a_fee_rate_changed_between_runs_never_takes_back_nor_overcharges(billed, bps_before, bps_after) -> None:
    prev = LeaseBill(value=billed * 3600, billed_micros=billed, fees_micros=fees_on(billed, bps_before),
                     hold_micros=10**9)
    b = bill(prev, delta_gpu_s=3600, price_micros_per_h=1_000_000, fee_bps=bps_after, free_of_charge=False)
    assert 0 <= b.fee_micros <= b.charge_micros == 1_000_000


def test_spot_leases_pay_the_spot_price_clamped_firm_leases_their_own() -> None:
    kw = dict(cleared_micros_per_h=2_000_000, floor_micros_per_h=1_500_000, limit_micros_per_h=3_000_000)
    assert price_in_force(tier="spot", spot_micros_per_h=2_500_000, **kw) == 2_500_000
    assert price_in_force(tier="spot", spot_micros_per_h=1_000_000, **kw) == 1_500_000
    assert price_in_force(tier="spot", spot_micros_per_h=9_000_000, **kw) == 3_000_000
    assert price_in_force(tier="spot", spot_micros_per_h=None, **kw) == 2_000_000
    assert price_in_force(tier="firm", spot_micros_per_h=9_000_000, **kw) == 2_000_000
