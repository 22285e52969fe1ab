"""Checks after every step of the simulation: the database audit (`gpux audit`'s invariants: money,
billing, GPUs, host health, requeues), the book against the database right after a tick, and the
simulation's own checks that a snapshot of the database cannot make alone: what the exchange
acknowledged (bids, deposits) is never lost, a bid's status moves only forward, an ended lease stays
ended as it ended (history), and a few shape checks of fills and live GPUs."""
from __future__ import annotations

import inspect
from datetime import datetime

import asyncpg

from exchange.ledger.audit import METER_BOUNDS_CHECK, run_audit
from exchange.leases.lifecycle import PREEMPTION_REASONS
from exchange.sim.driver import Driver, SimFailure, acknowledged_deposits
from exchange.sim.money_model import bid_hold_micros, fill_hold_micros, micros

# run_audit grows keyword arguments (the time, the settlement and host graces); pass those it takes.
_AUDIT_PARAMS = set(inspect.signature(run_audit).parameters)
_PREEMPTIONS = [str(r) for r in PREEMPTION_REASONS]
# The meter bounds check scans every stored sample (tripling a seed's time when run after every
# step). Samples are never changed or deleted, so a sample breaking the bounds stays: checking every
# few steps and at the seed's end (`finish`) finds every one, naming the step only to within this.
METER_CHECK_EVERY_STEPS = 25

# (check, SQL returning the offending rows), beside the audit's. Parameters by name, if ever needed:
# :now the simulation's time, :mark the largest lease id before this step, :preempt the preemption reasons,
# :fee_bps the seed's fee rate (the audit cannot know the rate a lease was billed at; the seed does).
SQL_CHECKS: list[tuple[str, str]] = [
    ("a filled bid has its whole gang leased in one tick",
     "SELECT b.id, b.gpus, g.tick_id, g.gpus AS leased FROM bids b LEFT JOIN LATERAL"
     " (SELECT l.tick_id, sum(l.gpus) AS gpus FROM leases l WHERE l.bid_id = b.id GROUP BY l.tick_id"
     "  ORDER BY l.tick_id DESC LIMIT 1) g ON true"
     " WHERE b.status = 'filled' AND g.gpus IS DISTINCT FROM b.gpus"),
    ("an open bid has no live lease",
     "SELECT b.id, l.id AS lease_id, l.status FROM bids b JOIN leases l ON l.bid_id = b.id"
     " WHERE b.status = 'open' AND l.status IN ('active', 'ending')"),
    ("a live lease holds exactly its GPUs, an ended one none",
     "SELECT l.id, l.status, l.gpus, count(lg.uuid) FILTER (WHERE lg.live) AS live_gpus FROM leases l"
     " LEFT JOIN lease_gpus lg ON lg.lease_id = l.id GROUP BY l.id"
     " HAVING count(lg.uuid) FILTER (WHERE lg.live) <> CASE WHEN l.status IN ('active', 'ending') THEN l.gpus ELSE 0 END"),
    # The reclaim rule (SPEC §5), re-derived: never a firm lease, and a gang ends whole or not at all.
    ("a reclaim never takes a firm lease",
     "SELECT id, tier, reclaim_id FROM leases WHERE reclaim_id IS NOT NULL AND tier <> 'spot' ORDER BY id"),
    ("a reclaim takes a gang whole: no lease of a victim's gang runs on past the victim",
     "SELECT v.id AS victim, v.reclaim_id, v.end_at, o.id AS gang_lease, o.status, o.end_at AS gang_end_at"
     " FROM leases v JOIN leases o ON o.bid_id = v.bid_id AND o.tick_id = v.tick_id AND o.id <> v.id"
     " WHERE v.reclaim_id IS NOT NULL AND v.end_reason = 'reclaimed' AND o.reclaim_id IS DISTINCT FROM v.reclaim_id"
     " AND (o.end_at IS NULL OR o.end_at > v.end_at) ORDER BY v.id"),
    ("each lease's fee is floor(billed x fee rate / 10000) at the seed's rate",
     "SELECT id, billed_amount, fees_amount, billed_amount * :fee_bps / 10000 AS expected FROM leases"
     " WHERE fees_amount <> billed_amount * :fee_bps / 10000 ORDER BY id"),
]

# What every seed of LIVENESS_MIN_STEPS steps or more must have done by its end. A build that refuses
# much of what it is asked (meter reports, fills) passes every other check while doing nothing.
LIVENESS_MIN_STEPS = 150
SEED_MINIMUMS = {"leases": 1, "leases ended": 1, "micro-dollars billed": 1, "offers expired": 1}
SEED_COUNTS_SQL = (
    "SELECT (SELECT count(*) FROM leases) AS \"leases\","
    " (SELECT count(*) FROM leases WHERE end_reason = 'completed') AS \"completed leases\","
    " (SELECT count(*) FROM leases WHERE end_reason IS NOT NULL) AS \"leases ended\","
    " (SELECT coalesce(sum(billed_amount), 0)::bigint FROM leases) AS \"micro-dollars billed\","
    " (SELECT count(*) FROM offers WHERE available_until <= $1) AS \"offers expired\","
    " (SELECT count(*) FROM leases WHERE requeued_at IS NOT NULL) AS \"leases requeued\","
    " (SELECT count(*) FROM leases WHERE end_reason IN ('outbid', 'reclaimed', 'host_failed', 'gang_failed'))"
    "   AS \"leases preempted\"")


async def seed_counts(conn: asyncpg.Connection, now: datetime) -> dict[str, int]:
    return dict(await conn.fetchrow(SEED_COUNTS_SQL, now))


# A bid's status may move only along these edges (filled -> open: a preempted bid requeued).
BID_MOVES = {("open", "filled"), ("open", "cancelled"), ("open", "expired"), ("filled", "open")}


class Auditor:
    def __init__(self, conn: asyncpg.Connection, driver: Driver) -> None:
        self.conn = conn
        self.driver = driver
        self.lease_mark = 0           # leases with larger ids started in the current step
        self.bid_status: dict[int, str] = {}
        self.ended: dict[int, tuple] = {}  # lease id -> (status, end_reason, end_at) once terminal
        self.steps_checked = 0

    async def before_step(self) -> None:
        self.lease_mark = await self.conn.fetchval("SELECT coalesce(max(id), 0) FROM leases")

    async def finish(self, liveness: bool = True) -> None:
        """After a seed's last step: the checks run only every few steps (the meter bounds), and with
        `liveness` (a seed of LIVENESS_MIN_STEPS or more) that the seed did something of each kind."""
        await self._audit(self.driver.clock(), every_check=True)
        if liveness:
            counts = await seed_counts(self.conn, self.driver.clock())
            short = {name: (counts[name], least) for name, least in SEED_MINIMUMS.items() if counts[name] < least}
            if short:
                raise SimFailure("a seed does something: leases made and ended, money billed, an offer expired",
                                 {"(done, at least)": short, "counts": counts})

    async def _audit(self, now: datetime, every_check: bool) -> None:
        self.steps_checked += 1
        kwargs = self._audit_kwargs(now)
        if "skip" in _AUDIT_PARAMS and not every_check and self.steps_checked % METER_CHECK_EVERY_STEPS:
            kwargs["skip"] = (METER_BOUNDS_CHECK,)
        breaches = await run_audit(self.conn, **kwargs)
        if breaches:
            name, rows = breaches[0]
            raise SimFailure(f"audit: {name}", rows[:5] + ([f"(+{len(breaches) - 1} more breached checks: "
                                                          + ", ".join(n for n, _ in breaches[1:]) + ")"]
                                                         if len(breaches) > 1 else []))

    async def check(self) -> None:
        """Raise SimFailure on the first breached check."""
        driver = self.driver
        now = driver.clock()
        await self._audit(now, every_check=False)
        if driver.book_fresh and driver.sync is not None:
            await self._check_book(driver.sync)
        for name, sql in SQL_CHECKS:
            bound, args = self._bind(sql, now)
            rows = await self.conn.fetch(bound, *args)
            if rows:
                raise SimFailure(name, [dict(r) for r in rows[:5]])
        await self._check_bids()
        await self._check_holds()
        await self._check_ended_leases()
        await self._check_deposits()

    def _audit_kwargs(self, now: datetime) -> dict:
        settings = self.driver.settings
        offered = {"now": now, "close_after_s": settings.settle_close_after_s, "settle_s": settings.settle_s,
                   "host_grace_s": settings.host_grace_s, "host_fail_s": settings.host_fail_s,
                   "fee_bps": settings.fee_bps, "max_gap_s": settings.meter_max_gap_s}
        return {k: v for k, v in offered.items() if k in _AUDIT_PARAMS}

    def _bind(self, sql: str, now: datetime) -> tuple[str, list]:
        """Named parameters to asyncpg's numbered ones, each with its type."""
        values = {":now": ("timestamptz", now), ":mark": ("bigint", self.lease_mark), ":preempt": ("text[]", _PREEMPTIONS),
                  ":fee_bps": ("bigint", self.driver.workload.fee_bps)}
        args: list = []
        for name, (kind, value) in values.items():
            if name in sql:
                args.append(value)
                sql = sql.replace(name, f"${len(args)}::{kind}")
        return sql, args

    async def _check_book(self, sync) -> None:
        """Right after a tick the book holds exactly the open bids."""
        if hasattr(sync, "book_drift"):
            missing, extra = await sync.book_drift(self.conn)
        else:
            resting = {bid_id for state in sync.models.values() for bid_id in state.resting}
            open_ids = {r["id"] for r in await self.conn.fetch("SELECT id FROM bids WHERE status = 'open'")}
            missing, extra = open_ids - resting, resting - open_ids
        if missing or extra:
            raise SimFailure("after a tick the book holds exactly the open bids",
                             {"open but not in the book": sorted(missing)[:10],
                              "in the book but not open": sorted(extra)[:10]})

    async def _check_bids(self) -> None:
        """Every acknowledged bid is stored as acknowledged; statuses move only along allowed edges."""
        rows = {r["id"]: r for r in await self.conn.fetch(
            "SELECT id, account_id, client_order_id, gpus, status, requeue_on_preempt FROM bids")}
        model = self.driver.model
        for acked in model.bids.values():
            row = rows.get(acked.bid_id)
            if (row is None or row["client_order_id"] != acked.coid
                    or row["account_id"] != model.tenant_ids[acked.tenant] or row["gpus"] != acked.body["gpus"]):
                raise SimFailure("an acknowledged bid is never lost",
                                 f"{acked.coid} acknowledged as bid {acked.bid_id}; stored: {dict(row) if row else None}")
            acked.status = row["status"]
        for bid_id, row in rows.items():
            before = self.bid_status.get(bid_id)
            status = row["status"]
            if before is not None and before != status:
                if (before, status) not in BID_MOVES or (before == "filled" and not row["requeue_on_preempt"]):
                    raise SimFailure("a bid's status moves only forward (filled -> open only to requeue)",
                                     f"bid {bid_id}: {before} -> {status}")
            self.bid_status[bid_id] = status

    async def _check_holds(self) -> None:
        """Against the simulation's own arithmetic (exchange/sim/money_model.py): an open bid holds
        limit x GPUs x duration rounded up; a bid's leases started in this step hold together, before
        any settlement, what they can cost at its terms, and carry its terms."""
        by_id = {acked.bid_id: acked for acked in self.driver.model.bids.values()}
        for row in await self.conn.fetch("SELECT id, hold_amount FROM bids WHERE status = 'open' ORDER BY id"):
            acked = by_id.get(row["id"])
            if acked is not None and row["hold_amount"] != bid_hold_micros(acked.body):
                raise SimFailure("an open bid holds limit x GPUs x duration, rounded up",
                                 {"bid": row["id"], "terms": acked.body, "held": row["hold_amount"],
                                  "model": bid_hold_micros(acked.body)})
        fills = await self.conn.fetch(
            "SELECT bid_id, tick_id, min(tier) AS tier, min(price) AS price, max(price) AS max_price,"
            " min(limit_price) AS limit_price, max(limit_price) AS max_limit, sum(gpus)::int AS gpus,"
            " min(extract(epoch FROM planned_end_at - start_at))::int AS duration_s,"
            " max(extract(epoch FROM planned_end_at - start_at))::int AS max_duration_s,"
            " sum(hold_amount)::bigint AS held FROM leases WHERE id > $1 GROUP BY bid_id, tick_id"
            " HAVING bool_and(settled_at IS NULL) ORDER BY bid_id", self.lease_mark)
        for fill in fills:
            acked = by_id.get(fill["bid_id"])
            if acked is None:
                continue
            body = acked.body
            expected = fill_hold_micros(body, fill["tier"], fill["price"])
            terms = (fill["gpus"], fill["duration_s"], fill["max_duration_s"], fill["limit_price"], fill["max_limit"],
                     fill["max_price"], fill["tier"])
            want = (body["gpus"], body["duration_s"], body["duration_s"], micros(body["limit_price"]),
                    micros(body["limit_price"]), fill["price"], body["market"].rsplit("/", 1)[1])
            if terms != want or fill["held"] != expected:
                raise SimFailure("a fill leases the bid's terms and holds what its leases can cost",
                                 {"bid": fill["bid_id"], "terms": body, "leased (gpus, duration, limit, price, tier)":
                                  terms, "held": fill["held"], "model": expected})

    async def _check_ended_leases(self) -> None:
        """A lease that ended or failed never changes its status, reason or end again."""
        rows = await self.conn.fetch(
            "SELECT id, status, end_reason, end_at FROM leases WHERE status IN ('ended', 'failed')")
        seen = set()
        for r in rows:
            seen.add(r["id"])
            now_is = (r["status"], r["end_reason"], r["end_at"])
            was = self.ended.setdefault(r["id"], now_is)
            if was != now_is:
                raise SimFailure("a lease that ended stays ended as it ended",
                                 f"lease {r['id']}: was {was}, now {now_is}")
        gone = set(self.ended) - seen
        if gone:
            lease_id = min(gone)
            row = await self.conn.fetchrow("SELECT status, end_reason, end_at FROM leases WHERE id = $1", lease_id)
            raise SimFailure("a lease that ended stays ended as it ended",
                             f"lease {lease_id}: was {self.ended[lease_id]}, now {dict(row) if row else None}")

    async def _check_deposits(self) -> None:
        """Every acknowledged deposit is in its tenant's books, once."""
        expected = acknowledged_deposits(self.driver.model)
        rows = await self.conn.fetch(
            "SELECT t.account_id, sum(p.amount)::bigint AS total FROM transfers t JOIN postings p ON p.transfer_id = t.id"
            " JOIN ledger_accounts la ON la.id = p.ledger_account_id AND la.account_id = t.account_id"
            " AND la.kind = 'available' WHERE t.kind = 'deposit' GROUP BY t.account_id")
        stored = {r["account_id"]: r["total"] for r in rows}
        if stored != {k: v for k, v in expected.items() if v}:
            raise SimFailure("every acknowledged deposit is in the books, once",
                             {"acknowledged": expected, "stored": stored})
