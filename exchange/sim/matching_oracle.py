"""The matching oracle: a ModelBook that also keeps the plain records it was given (blocks, bids of
both tiers, incumbents) and, at each tick, clears the same book with `matching.reference` (the plain
Python statement of the rule, docs/matching.md) before the engine does. Any difference in fills,
prices, indicative prices, unfilled reasons or outbid leases is recorded; the driver fails the seed
on it after the tick. Winners then leave the mirror and blocks keep the reference's free GPUs, as
the engine's book does."""
from __future__ import annotations

import numpy as np

from matching import ModelBook, Tier
from matching.arrays import BID_FIELDS, BLOCK_FIELDS
from matching.reference import reference_tick


def _records(fields, columns: dict) -> list[dict]:
    arrays = [np.asarray(columns[name]).reshape(-1).tolist() for name, _ in fields]
    return [dict(zip((name for name, _ in fields), row)) for row in zip(*arrays)]


class MirroredBook(ModelBook):
    def __init__(self) -> None:
        super().__init__()
        self.block_records: dict[int, dict] = {}
        self.bid_records: dict[Tier, dict[int, dict]] = {Tier.FIRM: {}, Tier.SPOT: {}}
        self.incumbent_records: list[dict] = []
        self.disagreements: list[dict] = []

    def upsert_blocks(self, **columns) -> None:
        super().upsert_blocks(**columns)
        for record in _records(BLOCK_FIELDS, columns):
            self.block_records[record["block_id"]] = record

    def remove_blocks(self, block_ids) -> None:
        super().remove_blocks(block_ids)
        for block_id in np.asarray(block_ids).reshape(-1).tolist():
            self.block_records.pop(block_id, None)

    def add_bids(self, tier, **columns) -> None:
        super().add_bids(tier, **columns)
        for record in _records(BID_FIELDS, columns):
            self.bid_records[Tier(tier)][record["bid_id"]] = record

    def remove_bids(self, tier, bid_ids) -> None:
        super().remove_bids(tier, bid_ids)
        for bid_id in np.asarray(bid_ids).reshape(-1).tolist():
            self.bid_records[Tier(tier)].pop(bid_id, None)

    def set_incumbents(self, lease_id, limit) -> None:
        super().set_incumbents(lease_id, limit)
        ids, limits = np.asarray(lease_id).reshape(-1).tolist(), np.asarray(limit).reshape(-1).tolist()
        self.incumbent_records = [{"lease_id": i, "limit": lim} for i, lim in zip(ids, limits)]

    def tick(self, now: int):
        expected = reference_tick(list(self.block_records.values()), list(self.bid_records[Tier.FIRM].values()),
                                  list(self.bid_records[Tier.SPOT].values()), self.incumbent_records, now)
        result = super().tick(now)
        for tier, got, want in ((Tier.FIRM, result.firm.as_dict(), expected.firm),
                                (Tier.SPOT, result.spot.as_dict(), expected.spot)):
            if got != want:
                differ = {key: {"engine": got.get(key), "reference": want.get(key)}
                          for key in sorted(set(got) | set(want)) if got.get(key) != want.get(key)}
                self.disagreements.append({"now": now, "tier": tier.name, **differ})
        for tier, cleared in ((Tier.FIRM, expected.firm), (Tier.SPOT, expected.spot)):
            for bid_id, _, _ in cleared["fills"]:
                self.bid_records[tier].pop(bid_id, None)
        for block_id, free in expected.free_after.items():
            self.block_records[block_id]["free"] = free
        return result
