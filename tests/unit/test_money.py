import re

import pytest
from hypothesis import given, strategies as st

from exchange.core.money import MAX_WIRE_MICROS, MONEY_PATTERN, cost_micros, format_money, parse_money


@pytest.mark.parametrize(("text", "micros"), [("0", 0), ("2.35", 2_350_000), ("1000.00", 1_000_000_000),
                                              ("0.000001", 1), ("12.5", 12_500_000)])
def test_parse_money(text: str, micros: int) -> None:
    assert parse_money(text) == micros


REFUSED = ["-1", "1.0000001", "1e3", " 1", "01.5", "", ".5", "1.", "NaN", "1,5",
           # matched whole: Python's `$` alone accepts a trailing newline
           "2.5\n", "2\n", "2.5\n\n", "2.5 ", "\n2.5",
           # ASCII digits only ("²".isdigit() is True; int() reads Arabic-Indic digits)
           "²", "1.²", "١٢", "１２",
           # at most 12 digits before the point (an amount stays below 10**18 micro-dollars)
           "1000000000000", "1000000000000.5"]


@pytest.mark.parametrize("text", REFUSED)
def test_parse_money_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_money(text)


@pytest.mark.parametrize("text", REFUSED)
def test_the_wire_pattern_refuses_what_parse_money_refuses(text: str) -> None:
    """msgspec checks MONEY_PATTERN with re.search; it must refuse the same texts, so a body that
    passes the schema never fails in parse_money."""
    assert re.search(MONEY_PATTERN, text) is None


def test_the_largest_amount_on_the_wire_fits_bigint() -> None:
    assert parse_money("999999999999.999999") == MAX_WIRE_MICROS < 2**63 - 1


@given(st.integers(min_value=0, max_value=10**15))
def test_format_then_parse_is_identity(micros: int) -> None:
    assert parse_money(format_money(micros)) == micros


def test_cost_rounds_up_to_the_micro_dollar() -> None:
    assert cost_micros(2_500_000, 2, 3600) == 5_000_000
    assert cost_micros(1, 1, 1) == 1  # 1/3600 of a micro-dollar still holds one micro-dollar
