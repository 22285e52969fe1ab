"""The simulation's independent model of metering and settlement (plain Python: no SQL, no import of
the product's metering, settlement or ledger code). Written from the SPEC's rules as the README states
them, it computes from what the workload itself sent what every settlement run must bill:

- *metered time*: a GPU-second is billed only when a healthy sample covers it; a sample covers the
  time up to that GPU's next sample on the lease's host (it needs one), at most the max gap, clipped
  to the lease's window [start, min(end, planned end, now)); samples before the start count nothing;
  the sum is floored to whole GPU-seconds, capped by the wall clock (GPUs x window, floored) and
  never below what was billed already;
- *price in force* at each run: a firm lease its cleared price; a spot lease the market's spot price
  (the last tick's clearing price, else its highest competing limit, else 0; its own cleared price
  while its market has no tick), clamped to [floor, limit];
- *money*: value += price x new GPU-seconds; billed = floor(value / 3600), each run's charge capped by
  the lease's hold; fee = floor(billed x fee_bps / 10000) on the running total; a lease reclaimed free
  of charge gets everything refunded and is billed at 0 from then on; once it is over and the close
  delay has passed, the rest of its hold goes back to the tenant.

The lease facts (which leases exist, their hosts, GPUs, windows, tiers, prices, terms and the free
flag) are read from the database: they are what the market did, checked elsewhere (the fill and hold
checks, the audit). The money is the model's own."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from exchange.sim.money_model import BPS, SECONDS_PER_HOUR

MICROS_PER_S = 1_000_000


@dataclass
class LeaseMoney:
    """The model's running totals of one lease."""
    hold: int
    billed_gpu_s: int = 0
    value: int = 0
    billed: int = 0
    fees: int = 0
    closed: bool = False
    refunded: bool = False


@dataclass
class BillingModel:
    fee_bps: int
    max_gap_s: float
    close_after_s: float
    # (host id, GPU uuid) -> {sample time: healthy}, every sample the exchange accepted.
    samples: dict[tuple[int, str], dict[datetime, bool]] = field(default_factory=dict)
    spot: dict[str, int] = field(default_factory=dict)  # market -> spot price in force (micro-dollars per GPU-hour)
    leases: dict[int, LeaseMoney] = field(default_factory=dict)

    def stored(self, host_id: int, samples: list[tuple[str, datetime, bool]]) -> None:
        for uuid, ts, healthy in samples:
            self.samples.setdefault((host_id, uuid), {})[ts] = healthy

    def ticked(self, market: str, price: int | None, competing_limit: int | None) -> None:
        if market.endswith("/spot"):
            self.spot[market] = price if price is not None else (competing_limit if competing_limit is not None else 0)

    def covered_us(self, host_id: int, uuid: str, start: datetime, stop: datetime) -> int:
        """Microseconds of [start, stop) that healthy samples of this GPU on this host cover."""
        gap = timedelta(seconds=self.max_gap_s)
        times = sorted(ts for ts in self.samples.get((host_id, uuid), {}) if start <= ts < stop + gap)
        healthy = self.samples.get((host_id, uuid), {})
        total = timedelta(0)
        for ts, next_ts in zip(times, times[1:]):
            if healthy[ts] and ts < stop:
                total += min(next_ts, ts + gap, stop) - ts
        return total // timedelta(microseconds=1)

    def settle(self, leases: list[dict], now: datetime) -> None:
        """One settlement run at `now` over the leases as they stood before it (dicts of the lease
        facts: id, host_id, gpu_uuids, gpus, start_at, end_at, planned_end_at, status, tier, market,
        price, floor_price, limit_price, free_of_charge, hold_amount)."""
        for lease in leases:
            money = self.leases.get(lease["id"])
            if money is None:  # first seen: the hold its fill placed (checked by the auditor's fill check)
                money = self.leases[lease["id"]] = LeaseMoney(hold=lease["hold_amount"])
            if money.closed:
                continue
            stop = min(lease["end_at"] or lease["planned_end_at"], lease["planned_end_at"], now)
            covered_s = sum(self.covered_us(lease["host_id"], uuid, lease["start_at"], stop)
                            for uuid in lease["gpu_uuids"]) // MICROS_PER_S
            window_us = max(timedelta(0), stop - lease["start_at"]) // timedelta(microseconds=1)
            wall_clock_s = window_us * lease["gpus"] // MICROS_PER_S
            metered_s = max(min(covered_s, wall_clock_s), money.billed_gpu_s)
            delta_s = metered_s - money.billed_gpu_s
            price = self.price_in_force(lease)
            if lease["free_of_charge"]:
                if not money.refunded:
                    money.hold += money.billed
                    money.billed = money.fees = money.value = 0
                    money.refunded = True
                price = 0
            money.value += price * delta_s
            charge = max(0, min(money.value // SECONDS_PER_HOUR - money.billed, money.hold))
            money.billed += charge
            fee = min(max(0, money.billed * self.fee_bps // BPS - money.fees), charge)
            money.fees += fee
            money.hold -= charge
            money.billed_gpu_s = metered_s
            if lease["status"] in ("ended", "failed") and now >= stop + timedelta(seconds=self.close_after_s):
                money.hold = 0
                money.closed = True

    def price_in_force(self, lease: dict) -> int:
        if lease["tier"] != "spot":
            return lease["price"]
        spot = self.spot.get(lease["market"], lease["price"])
        return min(max(spot, lease["floor_price"]), lease["limit_price"])
