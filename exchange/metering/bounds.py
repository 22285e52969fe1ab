"""What a meter reading may say: the physics of a GPU and the host's own inventory.

The one place the bounds are written. Ingest (`exchange.metering.service`) refuses a sample that
breaks them; settlement (`exchange.settlement.service`) counts energy only for rises within them
(samples stored before these bounds existed may break them); `gpux audit` reports any stored
sample that breaks them.

Power: a card never draws much more than its board power limit, the most its power limit can be
set to. The figures are the maximum TDP / board power in NVIDIA's datasheets for each family's
largest variant (SXM where there is one): H100 SXM5 700 W (H800: the same board), H200 SXM 700 W,
B200 1,000 W in HGX B200 and up to 1,200 W in some systems (the higher taken), GB200 1,200 W per
GPU, A100 SXM4 400 W (A800: the same board), L40S 350 W, L40 300 W, A40 300 W, A10 150 W, L4 72 W,
V100 SXM3 350 W, T4 70 W. NVML's power reading is an average that can overshoot the limit briefly
(excursions when a load starts): the bound is the limit plus `POWER_HEADROOM_PCT`. A model not in
the table (any vendor's, any future card) gets `GENERIC_POWER_BOUND_MW`, above every card sold
today.

Energy: NVML's total energy counter (mJ since the driver loaded) rises by at most the power bound
times the time elapsed, plus one second at the bound (`ENERGY_SLACK_S`) for the jitter between when
an agent reads the counter and the time it stamps on the sample. A counter that goes *down* was
reset (a driver reload, an agent integrating power from a fresh start): it is accepted, and the
interval across the reset counts no energy, neither negative nor the new counter's whole value;
energy is never over-counted. `ENERGY_CEILING_MJ` bounds the counter itself: 10^16 mJ is a 2 kW
card running for 158 years, far below bigint (9.2 × 10^18).
"""
from __future__ import annotations

from datetime import timedelta

# Board power limit in watts by model family: the market model's name up to its first '-'
# ("H100-80GB" -> "H100"), upper case.
BOARD_POWER_LIMIT_W: dict[str, int] = {
    "H100": 700, "H200": 700, "H800": 700,
    "B200": 1200, "GB200": 1200,
    "A100": 400, "A800": 400,
    "L40S": 350, "L40": 300, "A40": 300, "A10": 150, "L4": 72,
    "V100": 350, "T4": 70,
}
POWER_HEADROOM_PCT = 25
GENERIC_POWER_BOUND_MW = 2_000_000  # 2 kW: an unknown model
ENERGY_SLACK_S = 1
ENERGY_CEILING_MJ = 10**16
UTIL_RANGE = (0, 100)
# A GPU's sensor reads between a cold-soaked card in a cold room and well past its shutdown
# temperature (about 90-105 °C on current cards); anything outside is not a reading.
TEMP_RANGE_C = (-40, 150)

POWER_BOUND_MW: dict[str, int] = {
    family: watts * 1000 * (100 + POWER_HEADROOM_PCT) // 100 for family, watts in BOARD_POWER_LIMIT_W.items()}


def model_family(model: str) -> str:
    return model.split("-", 1)[0].upper()


def power_bound_mw(model: str) -> int:
    return POWER_BOUND_MW.get(model_family(model), GENERIC_POWER_BOUND_MW)


def energy_rise_allowed(rise_mj: int, elapsed: timedelta, bound_mw: int) -> bool:
    """Whether a counter may rise by `rise_mj` (>= 0) in `elapsed` (> 0): exact, in microseconds."""
    elapsed_us = elapsed // timedelta(microseconds=1)
    return rise_mj * 1_000_000 <= bound_mw * (elapsed_us + ENERGY_SLACK_S * 1_000_000)


# The same rules for SQL (settlement, audit): the bounds as a relation, and the rise test. The
# VALUES list is built from the constants above, never from input.
POWER_BOUNDS_SQL = "(VALUES " + ", ".join(
    f"('{family}', {bound}::bigint)" for family, bound in sorted(POWER_BOUND_MW.items())) + ") AS pb(family, bound_mw)"


def family_sql(model_column: str) -> str:
    return f"upper(split_part({model_column}, '-', 1))"


def bound_sql(model_column: str) -> str:
    """The power bound of the GPU whose model is in `model_column` (unknown: the generic bound)."""
    return (f"coalesce((SELECT pb.bound_mw FROM {POWER_BOUNDS_SQL} WHERE pb.family = {family_sql(model_column)}),"
            f" {GENERIC_POWER_BOUND_MW})")


def rise_allowed_sql(rise: str, prev_ts: str, ts: str, bound_mw: str) -> str:
    """SQL for `energy_rise_allowed` (rise >= 0 assumed; numeric, never bigint arithmetic)."""
    return (f"({rise})::numeric <= ({bound_mw})::numeric"
            f" * (extract(epoch FROM ({ts}) - ({prev_ts})) + {ENERGY_SLACK_S})")
