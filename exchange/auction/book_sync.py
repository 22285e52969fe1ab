"""Keeps one matching.ModelBook per GPU model in step with the database, loading only what changed
since the last load.

Which bid changes are new is decided by transaction ids, not by the change sequence alone
(migration 0008): a transaction may take a change number and commit after a later-numbered change
was already loaded. Every change records the id of the transaction that wrote it (`change_xid`),
and every transaction that commits after a snapshot has an id at or above that snapshot's xmin; so
each load reads the rows whose change_xid is at or above the xmin of the previous load's snapshot,
in one snapshot of its own, and skips those it already applied at the same change number."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Callable
from datetime import datetime

import asyncpg
import numpy as np

from matching import ModelBook, Tier, hazard_budget_from_survival, rate_mph_from_per_hour

INT64_MAX = np.iinfo(np.int64).max
TIER_OF = {"spot": Tier.SPOT, "firm": Tier.FIRM}
BID_COLUMNS = ("SELECT b.id, b.change_seq, b.change_xid, b.status, b.gpus, b.duration_s, b.limit_price,"
               " b.min_survival, b.min_notice_s, b.time_in_force, m.model, m.tier"
               " FROM bids b JOIN markets m ON m.id = b.market")


def epoch(moment: datetime | None) -> int:
    return 0 if moment is None else int(moment.timestamp())


def snapshot_xmin(snapshot: str) -> int:
    """The xmin of a pg_snapshot in its text form `xmin:xmax:xip,...`."""
    return int(snapshot.split(":", 1)[0])


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
    last_change: int = 0  # the highest change number applied (for reading only: loads go by xid)
    # (owner id, fabric name) -> the engine's fabric id: a fabric is its owner's (a name like
    # "default" is every owner's own), so a multi-host gang never spans two owners.
    fabric_ids: dict[tuple[int, str], int] = field(default_factory=dict)
    # The snapshot of the last load (pg_snapshot text); None until the first load, which reads
    # every open bid.
    snapshot: str | None = None
    # bid id -> (change_seq, change_xid) of the changes applied whose xid is at or above the last
    # snapshot's xmin: the next load reads them again and must not apply them twice.
    applied: dict[int, tuple[int, int]] = field(default_factory=dict)
    # Models dropped by reset_model: the next load rebuilds them from every open bid.
    rebuild: set[str] = field(default_factory=set)
    book_factory: Callable[[], ModelBook] = ModelBook

    def state(self, model: str) -> ModelState:
        if model not in self.models:
            self.models[model] = ModelState(model=model, book=self.book_factory())
        return self.models[model]

    def fabric_id(self, owner_id: int, name: str) -> int:
        return self.fabric_ids.setdefault((owner_id, name), len(self.fabric_ids) + 1)

    async def load_bid_changes(self, conn: asyncpg.Connection) -> None:
        """Add bids that opened and remove bids that closed since the last load."""
        # One snapshot for the rows and for the xmin that the next load starts from.
        async with conn.transaction(isolation="repeatable_read", readonly=True):
            snapshot = await conn.fetchval("SELECT pg_current_snapshot()::text")
            if self.snapshot is None:
                rows = await conn.fetch(BID_COLUMNS + " WHERE b.status = 'open'")
            else:
                rows = await conn.fetch(BID_COLUMNS + " WHERE b.change_xid >= $1::xid8",
                                        snapshot_xmin(self.snapshot))
                if self.rebuild:
                    rows += await conn.fetch(BID_COLUMNS + " WHERE b.status = 'open' AND m.model = ANY($1::text[])",
                                             sorted(self.rebuild))
        rebuild, self.rebuild = self.rebuild, set()
        latest = {row["id"]: row for row in rows}  # one snapshot: a bid read twice is one version
        fresh = [row for row in latest.values()
                 if row["model"] in rebuild or self.applied.get(row["id"], (None,))[0] != row["change_seq"]]
        self._apply(fresh)
        xmin = snapshot_xmin(snapshot)
        self.applied = {bid_id: seen for bid_id, seen in self.applied.items() if seen[1] >= xmin}
        for row in latest.values():
            if row["change_xid"] >= xmin:
                self.applied[row["id"]] = (row["change_seq"], row["change_xid"])
        self.snapshot = snapshot

    async def reload_bids(self, conn: asyncpg.Connection, bid_ids: list[int]) -> None:
        """Re-read these bids and make the book hold exactly the open ones: for winners the engine
        already took out of its book but whose leases could not be persisted."""
        if not bid_ids:
            return
        rows = await conn.fetch(BID_COLUMNS + " WHERE b.id = ANY($1::bigint[])", [int(i) for i in bid_ids])
        self._apply(rows)

    async def load_model(self, conn: asyncpg.Connection, model: str, now: datetime) -> ModelState:
        """One model's whole book (open bids and live offers, both tiers: one walk clears both) as
        the caller's transaction sees it, into this fresh BookSync, for a one-off clearing that
        writes nothing (a quote, exchange/bids/quote.py); not for incremental loads after it.
        Good-till-date bids past their expire_at are left out, as the tick expires them before
        it clears. Incumbents are not loaded: they only decide which running leases are outbid."""
        assert self.snapshot is None and not self.models, "load_model fills a fresh BookSync"
        rows = await conn.fetch(BID_COLUMNS + " WHERE b.status = 'open' AND m.model = $1"
                                " AND NOT (b.time_in_force = 'gtd' AND b.expire_at <= $2)", model, now)
        # Off the event loop: building the engine's book costs CPU in proportion to the model's open
        # bids (~0.2 s for 100,000), and an API process serves other requests meanwhile.
        await asyncio.to_thread(self._apply, rows)
        await self.load_blocks(conn, now, of_model=model)
        return self.state(model)

    def reset_model(self, model: str) -> None:
        """Forget a model's book (when its tick could not be persisted, its winners are out of the
        engine and its ioc cancels undone); the next load rebuilds it from the database."""
        self.models.pop(model, None)
        self.rebuild.add(model)

    def _apply(self, rows: list[asyncpg.Record]) -> None:
        """Make the book agree with these bid rows: closed ones out, open ones (re-)added."""
        removes: dict[tuple[str, int], list[int]] = {}
        adds: dict[tuple[str, int], list[asyncpg.Record]] = {}
        for row in rows:
            state = self.state(row["model"])
            self.last_change = max(self.last_change, row["change_seq"])
            if row["id"] in state.resting:
                removes.setdefault((row["model"], state.resting.pop(row["id"])), []).append(row["id"])
                state.ioc.discard(row["id"])
                state.last_reason.pop(row["id"], None)
            if row["status"] == "open":
                adds.setdefault((row["model"], TIER_OF[row["tier"]]), []).append(row)
        for (model, tier), ids in removes.items():
            self.models[model].book.remove_bids(tier, np.array(ids, dtype=np.int64))
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

    def engine_bids(self) -> dict[int, str]:
        """bid id -> model, for every bid the engines hold live."""
        held: dict[int, str] = {}
        for model, state in self.models.items():
            held.update(dict.fromkeys(state.book.live_bid_ids().tolist(), model))
        return held

    def engine_totals(self) -> tuple[int, int]:
        """(count, sum of ids) of the bids the engines hold live: a cheap fingerprint to compare
        with the database's open bids before computing the full drift."""
        count = total = 0
        for state in self.models.values():
            ids = state.book.live_bid_ids()
            count += len(ids)
            total += int(ids.sum(dtype=np.int64)) if len(ids) else 0
        return count, total

    async def book_drift(self, conn: asyncpg.Connection) -> tuple[list[int], list[int]]:
        """(open bids in the database the engines do not hold, bids the engines hold that are not
        open in the database), in one snapshot, ignoring bids whose latest change the last load
        could not see (they are pending for the next load), and the bids of models waiting for a
        rebuild. Sound only between ticks (during one, winners are out of the engine until their
        leases are written)."""
        if self.snapshot is None:
            return [], sorted(self.engine_bids())
        held = self.engine_bids()
        rows = await conn.fetch(
            "SELECT b.id, b.status = 'open' AS open, m.model,"
            " pg_visible_in_snapshot(b.change_xid, $1::text::pg_snapshot) AS seen"
            " FROM bids b JOIN markets m ON m.id = b.market"
            " WHERE b.status = 'open' OR b.id = ANY($2::bigint[])", self.snapshot, list(held))
        found = {r["id"]: r for r in rows}
        missing = sorted(r["id"] for r in rows
                         if r["open"] and r["seen"] and r["model"] not in self.rebuild and r["id"] not in held)
        extra = sorted(bid_id for bid_id in held
                       if bid_id not in found or (found[bid_id]["seen"] and not found[bid_id]["open"]))
        return missing, extra

    async def load_blocks(self, conn: asyncpg.Connection, now: datetime, *, of_model: str | None = None) -> None:
        """Refresh every live offer (of `of_model` only, when given) as a block: what is free changes
        with every lease, so blocks are re-sent each tick (there are far fewer of them than bids)."""
        rows = await live_offers(conn, now, None if of_model is None else [of_model])
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
                fabric_id=np.array([self.fabric_id(r["owner_id"], r["fabric"]) for r in live], dtype=np.int64),
                host_gpus=np.array([max(r["host_gpus"], r["gpus"]) for r in live], dtype=np.int32),
                gpus=np.array([r["gpus"] for r in live], dtype=np.int32),
                free=np.array([free_gpus(r["gpus"], r["host_gpus"], r["leased"], r["reclaimed"], r["health"])
                               for r in live], dtype=np.int32),
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


async def live_offers(db: asyncpg.Connection | asyncpg.Pool, now: datetime,
                      models: list[str] | None = None) -> list[asyncpg.Record]:
    """Every live offer available now (of `models` only, when given) with what its host holds:
    the one reading of an offer's free GPUs (`free_gpus`), for the matching book and the public
    market data alike."""
    where_models = "" if models is None else " AND o.model = ANY($2::text[])"
    return await db.fetch(
        # The owner's own demand comes first: GPUs an active reclaim holds that no live lease
        # holds are not for sale (view reclaim_outstanding; a victim's share is leased until
        # its lease ends, and counted as leased here until then).
        "SELECT o.id, o.host_id, h.owner_id, h.fabric, h.health, o.model, o.gpus, o.floor_price, o.available_until,"
        " o.firm_until, o.reclaim_notice_s, o.reclaim_rate_per_h, hg.host_gpus, hg.leased,"
        " coalesce(ro.gpus, 0) AS reclaimed,"
        # ...and no spot lease is placed across a reservation the owner scheduled on this host.
        " (SELECT min(r.at) FROM reclaims r WHERE r.status = 'scheduled' AND r.model = o.model"
        "   AND (r.host_id = o.host_id OR (r.host_id IS NULL AND r.owner_id = h.owner_id))) AS cut_at"
        " FROM offers o JOIN hosts h ON h.id = o.host_id"
        # What live leases hold on the host, whichever offer sold them: an offer withdrawn and
        # republished while its leases run must not look free.
        " CROSS JOIN LATERAL (SELECT count(*) AS host_gpus, count(*) FILTER (WHERE EXISTS"
        "   (SELECT 1 FROM lease_gpus lg WHERE lg.uuid = g.uuid AND lg.live)) AS leased"
        "   FROM gpus g WHERE g.host_id = o.host_id AND g.present AND g.model = o.model) hg"
        " LEFT JOIN reclaim_outstanding ro ON ro.host_id = o.host_id AND ro.model = o.model"
        " WHERE o.status = 'live' AND o.available_from <= $1 AND o.available_until > $1" + where_models +
        " ORDER BY o.id", now, *([] if models is None else [models]))


def free_gpus(offer_gpus: int, host_gpus: int, leased_on_host: int, reclaimed_on_host: int, health: str) -> int:
    """GPUs of an offer for sale now: the offered GPUs the host still has, less those live leases
    and the owner's reclaims hold on the host; none on a host that is not reporting."""
    assert reclaimed_on_host >= 0, reclaimed_on_host  # reclaim_outstanding sums counts; it never subtracts
    if health != "ok":
        return 0
    return max(0, min(offer_gpus, host_gpus) - leased_on_host - reclaimed_on_host)
