"""Money is integer micro-dollars inside and a decimal string on the wire; never a float."""
from __future__ import annotations

import re

MICROS_PER_DOLLAR = 1_000_000
SECONDS_PER_HOUR = 3600

# At most 6 decimals, no sign, no exponent, at most 12 digits before the point (so any amount on
# the wire is below 10**18 micro-dollars, inside bigint): the only accepted spelling of an amount.
# Matched whole: `(?!\n)$`, because Python's `$` alone also accepts a trailing newline ("2.5\n").
MONEY_PATTERN = r"^(0|[1-9][0-9]{0,11})(\.[0-9]{1,6})?(?!\n)$"
_MONEY_BODY = re.compile(r"(0|[1-9][0-9]{0,11})(\.[0-9]{1,6})?")
MAX_WIRE_MICROS = 10**18 - 1  # 999999999999.999999, the largest amount MONEY_PATTERN spells


def parse_money(text: str) -> int:
    """'2.35' -> 2_350_000. Raises ValueError for anything but a plain non-negative decimal."""
    if not isinstance(text, str) or not _MONEY_BODY.fullmatch(text):
        raise ValueError(f"not a decimal amount with at most 6 decimals: {text!r}")
    whole, _, frac = text.partition(".")
    return int(whole) * MICROS_PER_DOLLAR + int(frac.ljust(6, "0") or "0")


def money_field(field: str, text: str) -> int:
    """`parse_money` for a request field: a refusal is a 422 naming the field, never a 500."""
    from exchange.core.errors import InvalidField

    try:
        return parse_money(text)
    except ValueError:
        raise InvalidField(field, "a decimal amount in USD with at most 6 decimals, e.g. \"2.35\"") from None


def format_money(micros: int) -> str:
    """2_350_000 -> '2.35'; keeps at least two decimals, like a price board."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_DOLLAR)
    frac_text = f"{frac:06d}".rstrip("0").ljust(2, "0")
    return f"{sign}{whole}.{frac_text}"


def ceil_div(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def cost_micros(price_micros_per_gpu_h: int, gpus: int, seconds: int) -> int:
    """What `gpus` GPUs cost for `seconds` at a per-GPU-hour price, rounded up to the micro-dollar
    (a hold must always cover the charge it backs)."""
    return ceil_div(price_micros_per_gpu_h * gpus * seconds, SECONDS_PER_HOUR)


def split_hold(total_micros: int, gpus_per_part: list[int]) -> list[int]:
    """Split a hold over a gang's leases by GPUs: each part its floor share, the last part the
    remainder, so the parts add up to the total exactly and none is negative."""
    assert total_micros >= 0 and gpus_per_part and all(g > 0 for g in gpus_per_part)
    gpus_total = sum(gpus_per_part)
    parts = [total_micros * g // gpus_total for g in gpus_per_part[:-1]]
    parts.append(total_micros - sum(parts))
    return parts
