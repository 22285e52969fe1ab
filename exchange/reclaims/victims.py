"""Which spot leases a reclaim ends: named strategies over gangs (all live leases of one bid end
together: a multi-GPU lease ends whole or not at all). Pure functions, unit-tested."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Gang:
    """The live spot leases of one bid; `gpus` counts those on the hosts the reclaim may take."""
    bid_id: int
    lease_ids: tuple[int, ...]
    gpus: int
    price: int


class VictimStrategy(Protocol):
    name: str

    def choose(self, gangs: list[Gang], need: int) -> list[Gang]: ...


def _prune(chosen: list[Gang], need: int) -> list[Gang]:
    """Drop victims the others already cover, trying the dearest first, so that no lease ends for
    nothing and the cheapest leases are the ones that go."""
    kept = list(chosen)
    for gang in sorted(chosen, key=lambda g: (-g.price, g.gpus, -g.bid_id)):
        if sum(g.gpus for g in kept) - gang.gpus >= need:
            kept.remove(gang)
    return kept


def _take_in_order(gangs: list[Gang], need: int, key) -> list[Gang]:
    chosen, got = [], 0
    for gang in sorted(gangs, key=key):
        if got >= need:
            break
        chosen.append(gang)
        got += gang.gpus
    return _prune(chosen, need)


class CheapestFirst:
    """The default: lowest price first (they pay the owner least), then the fewest leases (larger
    gangs first at one price), then the youngest bid."""
    name = "cheapest_first"

    def choose(self, gangs: list[Gang], need: int) -> list[Gang]:
        return _take_in_order(gangs, need, key=lambda g: (g.price, -g.gpus, -g.bid_id))


class FewestLeases:
    """Disturb as few tenants as possible: largest gangs first, then the lowest price."""
    name = "fewest_leases"

    def choose(self, gangs: list[Gang], need: int) -> list[Gang]:
        return _take_in_order(gangs, need, key=lambda g: (-g.gpus, g.price, -g.bid_id))


VICTIM_STRATEGIES: dict[str, VictimStrategy] = {s.name: s for s in (CheapestFirst(), FewestLeases())}
