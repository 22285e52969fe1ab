"""The capacity owner's policy for one host: what to publish, at what floor, with which hooks.

A TOML file (see ``agents/example-policy.toml``) parsed into a frozen :class:`Policy`. Every
error names the offending key, because the person reading it is an operator editing a file.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from agents.probe import GpuInfo

__all__ = ["Policy", "PolicyError", "load_policy", "parse_policy", "price_to_micros", "select_gpus"]

_PRICE = re.compile(r"^\d+(\.\d{1,6})?$")
_MICROS_PER_USD = 1_000_000


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and the key."""


def price_to_micros(price: str) -> int:
    """``"1.80"`` -> ``1_800_000`` micro-dollars; at most 6 decimals, no sign, no exponent."""
    if not _PRICE.match(price):
        raise ValueError(f"{price!r} is not a decimal price with at most 6 decimals, e.g. \"1.80\"")
    whole, _, fraction = price.partition(".")
    return int(whole) * _MICROS_PER_USD + int(fraction.ljust(6, "0") or 0)


NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(gt=0)]


class Policy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    floor_price: str
    """USD per GPU-hour, a decimal string with at most 6 decimals ("1.80")."""
    firm_window_s: NonNegativeInt = 0
    """Each offer promises no reclaim until now + this (0: no firm window, spot only)."""
    reclaim_notice_s: NonNegativeInt = 120
    reclaim_rate_per_h: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    """Forecast hazard of a reclaim after the firm window (survival over d hours = exp(-rate*d))."""
    offer_horizon_s: PositiveInt = 86_400
    """How far ahead of now each offer's ``available_until`` is set."""
    offer_renew_before_s: PositiveInt | None = None
    """Publish the next offer when the live one has less than this left (default: horizon / 4)."""
    gpus: Literal["all"] | list[int | str] = "all"
    """"all", or the GPUs to publish by index (int) or UUID (str)."""
    on_lease_start: str | None = None
    on_lease_end: str | None = None
    hook_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    fabric: str | None = None
    """Interconnect domain, e.g. an InfiniBand pod; the exchange's host record is the authority."""

    def __post_init__(self) -> None:
        if not _PRICE.match(self.floor_price):
            raise ValueError(f"floor_price: {self.floor_price!r} is not a decimal price with at most 6 decimals, "
                             f"e.g. \"1.80\"")
        if isinstance(self.gpus, list):
            if not self.gpus:
                raise ValueError("gpus: an empty list publishes nothing; use \"all\" or name GPUs")
            if len(set(self.gpus)) != len(self.gpus):
                raise ValueError(f"gpus: {self.gpus!r} names a GPU twice")
        for key in ("on_lease_start", "on_lease_end", "fabric"):
            value = getattr(self, key)
            if value is not None and not value.strip():
                raise ValueError(f"{key}: empty; leave the key out instead")
        if self.offer_renew_before_s is not None and self.offer_renew_before_s >= self.offer_horizon_s:
            raise ValueError("offer_renew_before_s: must be below offer_horizon_s")

    @property
    def floor_price_micros(self) -> int:
        return price_to_micros(self.floor_price)

    @property
    def renew_before_s(self) -> int:
        return self.offer_renew_before_s if self.offer_renew_before_s is not None else max(1, self.offer_horizon_s // 4)


def parse_policy(text: str, *, source: str = "policy") -> Policy:
    """A policy from TOML text; :class:`PolicyError` names ``source`` and the bad key."""
    try:
        data: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise PolicyError(f"{source}: not valid TOML: {error}") from None
    if isinstance(data.get("floor_price"), int | float):
        # The easy mistake, worth its own message: money is never a float here.
        raise PolicyError(f"{source}: floor_price: write it as a quoted decimal string, "
                          f"e.g. floor_price = \"{data['floor_price']}\"")
    if isinstance(data.get("gpus"), str) and data["gpus"] != "all":
        raise PolicyError(f"{source}: gpus: must be \"all\" or a list of GPU indices and UUIDs, "
                          f"got {data['gpus']!r}")
    try:
        return msgspec.convert(data, Policy)
    except msgspec.ValidationError as error:
        raise PolicyError(f"{source}: {_name_the_key(str(error))}") from None


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise PolicyError(f"{path}: cannot read the policy file: {error.strerror or error}") from None
    return parse_policy(text, source=str(path))


def _name_the_key(message: str) -> str:
    """msgspec says "Expected `int` - at `$.firm_window_s`"; operators read "firm_window_s: ..."."""
    for msgspec_words, ours in (("Object missing required field", "missing required key"),
                                ("Object contains unknown field", "unknown key")):
        message = message.replace(msgspec_words, ours)
    problem, sep, where = message.rpartition(" - at `$.")
    if not sep:
        return message
    return f"{where.rstrip('`')}: {problem}"


def select_gpus(policy: Policy, inventory: Sequence[GpuInfo]) -> list[GpuInfo]:
    """The GPUs the policy publishes, in inventory order; names one the host does not have."""
    if policy.gpus == "all":
        return list(inventory)
    by_index = {gpu.index: gpu for gpu in inventory}
    by_uuid = {gpu.uuid: gpu for gpu in inventory}
    chosen: dict[str, GpuInfo] = {}
    for wanted in policy.gpus:
        gpu = by_index.get(wanted) if isinstance(wanted, int) else by_uuid.get(wanted)
        if gpu is None:
            raise PolicyError(f"gpus: this host has no GPU {wanted!r}")
        chosen[gpu.uuid] = gpu
    return [gpu for gpu in inventory if gpu.uuid in chosen]
