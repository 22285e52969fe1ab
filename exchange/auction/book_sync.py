"""Keeps one matching.ModelBook per GPU model in step with the database, loading only what changed
since the last tick (bids and offers carry a change sequence number, see migration 0002)."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

import asyncpg
import numpy as np

from matching import ModelBook, Tier, hazard_budget_from_survival, rate_mph_from_per_hour

INT64_MAX = np.iinfo(np.int64).max
TIER_OF = {"spot": Tier.SPOT, "firm": Tier.FIRM}


def epoch(moment: datetime | None) -> int:
    return 0 if moment is None else int(moment.timestamp())


@dataclass
class ModelState:
    """The engine's book for one GPU model, plus what the service needs to act on its results."""
    model: str
    book: ModelBook = field(default_factory=ModelBook)
    resting: dict[int, int] = field(default_factory=dict)        # bid id -> Tier, for removals
    ioc: set[int] = field(default_factory=set)                   # resting ioc bids: gone after one tick
    block_ids: set[int] = field(default_factory=set)
    last_reason: dict[int, tuple[str, int]] = field(default_factory=dict)
    markets: set[str] = field(default_factory=set)  # market ids seen in the database (never deleted)


@dataclass
class BookSync:
    models: dict[str, ModelState] = field(default_factory=dict)
    last_change: int = 0
    fabric_ids: dict[str, int] = field(default_factory=dict)

    def state(self, model: str) -> ModelState:
        if model not in self.models:
            self.models[model] = ModelState(model=model)
        return self.models[model]

    def fabric_id(self, name: str) -> int:
        return self.fabric_ids.setdefault(name, len(self.fabric_ids) + 1)

    async def load_bid_changes(self, conn: asyncpg.Connection) -> None:
        """Add bids that opened and remove bids that closed since the last tick."""
        rows = await conn.fetch(
            "SELECT b.id, b.change_seq, b.status, b.gpus, b.duration_s, b.limit_price, b.min_survival,"
            " b.min_notice_s, b.time_in_force, m.model, m.tier FROM bids b JOIN markets m ON m.id = b.market"
            " WHERE b.change_seq > $1 ORDER BY b.change_seq", self.last_change)
        if not rows:
            return
        self.last_change = max(self.last_change, max(r["change_seq"] for r in rows))
        adds: dict[tuple[str, int], list[asyncpg.Record]] = {}
        for row in rows:
            state = self.state(row["model"])
            if row["id"] in state.resting:
                state.book.remove_bids(state.resting.pop(row["id"]), np.array([row["id"]], dtype=np.int64))
                state.ioc.discard(row["id"])
                state.last_reason.pop(row["id"], None)
            if row["status"] == "open":
                adds.setdefault((row["model"], TIER_OF[row["tier"]]), []).append(row)
        for (model, tier), group in adds.items():
            state = self.state(model)
            group.sort(key=lambda r: r["id"])
            state.book.add_bids(
                tier,
                bid_id=np.array([r["id"] for r in group], dtype=np.int64),
                seq=np.array([r["id"] for r in group], dtype=np.int64),  # arrival order = time priority
                gpus=np.array([r["gpus"] for r in group], dtype=np.int32),
                duration_s=np.array([r["duration_s"] for r in group], dtype=np.int64),
                limit=np.array([r["limit_price"] for r in group], dtype=np.int64),
                hazard_budget=np.array([hazard_budget_from_survival(r["min_survival"]) for r in group], dtype=np.int64),
                min_notice_s=np.array([r["min_notice_s"] for r in group], dtype=np.int64),
            )
            for r in group:
                state.resting[r["id"]] = tier
                if r["time_in_force"] == "ioc":
                    state.ioc.add(r["id"])

    async def load_blocks(self, conn: asyncpg.Connection, now: datetime) -> None:
        """Refresh every live offer as a block: what is free changes with every lease, so blocks are
        re-sent each tick (there are far fewer of them than bids)."""
        rows = await conn.fetch(
            "SELECT o.id, o.host_id, h.fabric, o.model, o.gpus, o.floor_price, o.available_until, o.firm_until,"
            " o.reclaim_notice_s, o.reclaim_rate_per_h,"
            " (SELECT count(*) FROM gpus g WHERE g.host_id = o.host_id AND g.present AND g.model = o.model) AS host_gpus,"
            " (SELECT coalesce(sum(l.gpus), 0) FROM leases l WHERE l.offer_id = o.id"
            "   AND l.status IN ('active', 'ending')) AS leased,"
            # The owner's own demand comes first: GPUs reclaimed now are not for sale...
            " (SELECT coalesce(sum(rg.gpus), 0) FROM reclaim_gpus rg JOIN reclaims r ON r.id = rg.reclaim_id"
            "   WHERE rg.host_id = o.host_id AND r.status = 'active' AND r.model = o.model) AS reclaimed,"
            # ...and no spot lease is placed across a reservation the owner scheduled on this host.
            " (SELECT min(r.at) FROM reclaims r WHERE r.status = 'scheduled' AND r.model = o.model"
            "   AND (r.host_id = o.host_id OR (r.host_id IS NULL AND r.owner_id = h.owner_id))) AS cut_at"
            " FROM offers o JOIN hosts h ON h.id = o.host_id"
            " WHERE o.status = 'live' AND o.available_from <= $1 AND o.available_until > $1 ORDER BY o.id", now)
        by_model: dict[str, list[asyncpg.Record]] = {}
        for row in rows:
            by_model.setdefault(row["model"], []).append(row)
        for model in set(self.models) | set(by_model):
            state = self.state(model)
            live = by_model.get(model, [])
            gone = state.block_ids - {r["id"] for r in live}
            if gone:
                state.book.remove_blocks(np.array(sorted(gone), dtype=np.int64))
            state.block_ids = {r["id"] for r in live}
            if not live:
                continue
            state.book.upsert_blocks(
                block_id=np.array([r["id"] for r in live], dtype=np.int64),
                host_id=np.array([r["host_id"] for r in live], dtype=np.int64),
                fabric_id=np.array([self.fabric_id(r["fabric"]) for r in live], dtype=np.int64),
                host_gpus=np.array([max(r["host_gpus"], r["gpus"]) for r in live], dtype=np.int32),
                gpus=np.array([r["gpus"] for r in live], dtype=np.int32),
                free=np.array([max(0, min(r["gpus"], r["host_gpus"]) - r["leased"] - r["reclaimed"]) for r in live],
                              dtype=np.int32),
                floor=np.array([r["floor_price"] for r in live], dtype=np.int64),
                available_until=np.array([epoch(r["available_until"]) for r in live], dtype=np.int64),
                firm_until=np.array([epoch(r["firm_until"]) for r in live], dtype=np.int64),
                notice_s=np.array([r["reclaim_notice_s"] for r in live], dtype=np.int64),
                rate_mph=np.array([rate_mph_from_per_hour(r["reclaim_rate_per_h"]) for r in live], dtype=np.int64),
                cut_at=np.array([epoch(r["cut_at"]) if r["cut_at"] else INT64_MAX for r in live], dtype=np.int64),
            )

    async def load_incumbents(self, conn: asyncpg.Connection) -> None:
        rows = await conn.fetch(
            "SELECT l.id, l.limit_price, split_part(l.market, '/', 1) AS model FROM leases l"
            " WHERE l.tier = 'spot' AND l.status = 'active' ORDER BY l.id")
        by_model: dict[str, list[asyncpg.Record]] = {}
        for row in rows:
            by_model.setdefault(row["model"], []).append(row)
        for model, state in self.models.items():
            group = by_model.get(model, [])
            state.book.set_incumbents(np.array([r["id"] for r in group], dtype=np.int64),
                                      np.array([r["limit_price"] for r in group], dtype=np.int64))
