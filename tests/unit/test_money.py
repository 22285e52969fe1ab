import pytest
from hypothesis import given, strategies as st

from exchange.core.money import cost_micros, format_money, parse_money


@pytest.mark.parametrize(("text", "micros"), [("0", 0), ("2.35", 2_350_000), ("1000.00", 1_000_000_000),
                                              ("0.000001", 1), ("12.5", 12_500_000)])
def test_parse_money(text: str, micros: int) -> None:
    assert parse_money(text) == micros


@pytest.mark.parametrize("text", ["-1", "1.0000001", "1e3", " 1", "01.5", "", ".5", "1.", "NaN", "1,5"])
def test_parse_money_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_money(text)


@given(st.integers(min_value=0, max_value=10**15))
def test_format_then_parse_is_identity(micros: int) -> None:
    assert parse_money(format_money(micros)) == micros


def test_cost_rounds_up_to_the_micro_dollar() -> None:
    assert cost_micros(2_500_000, 2, 3600) == 5_000_000
    assert cost_micros(1, 1, 1) == 1  # 1/3600 of a micro-dollar still holds one micro-dollar
