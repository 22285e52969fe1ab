"""Executes the workload's steps against the real services on a real PostgreSQL database, on an
injected ManualClock. No HTTP: the services are called as the controllers call them. A refusal the
services raise as an ApiError is an answer only where the step's kind may get it and the simulation
can see why (`refusal_breach`: a bid refused for funds the tenant has, a cancel of an open bid, ...);
any other refusal or exception is a failure. The agents send only valid samples: a report's samples
are all accepted, none refused.

Time passes only in `advance` steps; while it passes, the agents that are not silent report their
samples (as a running agent would), and the exchange's periodic jobs run when due (a tick every
`tick_s`, settlement every `settle_s`, as the scheduler would), so time-based invariants hold
between steps. Ticks go through the MatchingLeader, which also fails silent hosts."""
from __future__ import annotations

import asyncio
import random
import traceback
from collections import Counter
from datetime import datetime, timedelta

import asyncpg

from exchange.accounts.schemas import AccountCreate, DepositCreate
from exchange.accounts.service import create_account, deposit
from exchange.auction.leader import MatchingLeader
from exchange.bids.schemas import BidCreate
from exchange.bids.service import cancel_bid, cancel_bid_on, insert_bid, place_bid
from exchange.core.auth import Principal
from exchange.core.clock import ManualClock
from exchange.core.context import AppContext
from exchange.core.errors import ApiError
from exchange.core.money import parse_money
from exchange.core.settings import Settings
from exchange.db.pool import create_pool
from exchange.hosts.schemas import HostCreate, Inventory, InventoryGpu
from exchange.hosts.service import create_host, put_inventory
from exchange.metering.schemas import MeterReport, MeterSample
from exchange.metering.service import ingest_report
from exchange.offers.schemas import OfferCreate
from exchange.offers.service import create_offer, withdraw_offer
from exchange.reclaims.schemas import ReclaimCreate
from exchange.reclaims.service import create_reclaim, release_reclaim
from exchange.settlement.service import settle
from exchange.sim.billing_model import BillingModel
from exchange.sim.matching_oracle import MirroredBook
from exchange.sim.money_model import bid_hold_micros, micros
from exchange.sim.workload import (GPUS_PER_HOST, MODEL, START, AckedBid, HostState, SimModel, Step, Workload)

SAMPLE_EVERY_S = 10
# The facts of every lease a settlement run sees (the billing model computes its money itself).
LEASE_FACTS_SQL = (
    "SELECT id, host_id, gpu_uuids, gpus, start_at, end_at, planned_end_at, status, tier, market, price, floor_price,"
    " limit_price, free_of_charge, hold_amount FROM leases ORDER BY id")


class SimFailure(Exception):
    """A breach found while executing a step (the auditor raises the same after it)."""

    def __init__(self, check: str, detail: object = None) -> None:
        super().__init__(check)
        self.check = check
        self.detail = detail


def sim_settings(workload: Workload) -> Settings:
    # Small graces so that a silent host is marked silent and then failed within a few steps.
    return Settings.from_env({}, fee_bps=workload.fee_bps, host_grace_s=30.0, host_fail_s=90.0, tick_s=2.0,
                             settle_s=60.0, settle_close_after_s=30.0, meter_max_gap_s=float(SAMPLE_EVERY_S),
                             min_duration_s=60, run_scheduler=False, log_level="WARNING")


class Driver:
    def __init__(self, url: str, workload: Workload, crash_rate: float = 0.0) -> None:
        self.url = url
        self.workload = workload
        # Crashes (FoundationDB's buggify): which operations crash is drawn from the seed; when, within
        # the operation, the crash lands is a wall-clock moment (0-15 ms in), so a seed run with
        # crashes replays its steps but not always its crash points.
        self.crash_rate = crash_rate
        self.crash_rng = random.Random(workload.seed * 7919 + 1)
        self.crashes = 0
        self.settings = sim_settings(workload)
        self.clock = ManualClock(START)
        self.model = SimModel(now=START)
        self.billing = BillingModel(fee_bps=workload.fee_bps, max_gap_s=self.settings.meter_max_gap_s,
                                    close_after_s=self.settings.settle_close_after_s)
        self.pool: asyncpg.Pool | None = None
        self.ctx: AppContext | None = None
        self.leader: MatchingLeader | None = None
        self.side: asyncpg.Connection | None = None  # the connection that holds transactions open
        # True right after a tick that saw every commit: the book must equal the open bids then.
        self.book_fresh = False
        self.ticked = False
        self.last_tick_at = START
        self.last_settle_at = START

    async def open(self) -> None:
        self.pool = await create_pool(self.url, min_size=1, max_size=3)  # races run two steps' calls at once
        self.ctx = AppContext(settings=self.settings, pool=self.pool, clock=self.clock)
        self.leader = MatchingLeader(self.ctx, self.url, book_factory=MirroredBook)
        self.side = await asyncpg.connect(self.url)

    async def close(self) -> None:
        if self.leader is not None:
            await self.leader.close()
        if self.side is not None:
            await self.side.close()
        if self.pool is not None:
            await self.pool.close()

    @property
    def sync(self):
        return self.leader.sync if self.leader is not None else None

    async def run(self, step: Step) -> str:
        """Execute one step; returns a short outcome. ApiError: an expected refusal."""
        self.book_fresh = False
        self.ticked = False
        try:
            return await getattr(self, "_" + step.kind)(step)
        except SimFailure:
            raise
        except ApiError as refusal:
            breach = await self.refusal_breach(step, refusal)
            if breach is not None:
                raise SimFailure("a step is refused only for a reason its kind allows and the simulation sees",
                                 f"{step} refused {refusal.code} ({refusal.field}): {refusal.message}; {breach}") from None
            return f"refused {refusal.code}"
        except Exception as error:  # a 500: the services must never raise anything else
            raise SimFailure("no step raises an unexpected exception",
                             "".join(traceback.format_exception(error)).strip()) from error

    async def refusal_breach(self, step: Step, refusal: ApiError) -> str | None:
        """None when `refusal` is an answer this step may get, from what the simulation knows; else why not."""
        code, field = refusal.code, refusal.field
        match step.kind, code:
            case ("bid", "idempotency_conflict") if step.arg("conflict"):
                return None
            case ("bid", "invalid_field") if field == "expire_at" and step.arg("expire_at") is not None \
                    and step.arg("expire_at") <= self.clock():
                return None  # a gtd bid retried after its expiry
            case ("bid" | "held_bid_tick" | "race_bid", "insufficient_funds"):
                available = await self.pool.fetchval(
                    "SELECT balance FROM ledger_accounts WHERE account_id = $1 AND kind = 'available'",
                    self.model.tenant_ids[step.arg("tenant")])
                need = bid_hold_micros(self._body(step))
                return None if available < need else f"the tenant has {available} available for a hold of {need}"
            case ("cancel" | "held_cancel_tick", "bid_not_open"):
                status = await self.pool.fetchval("SELECT status FROM bids WHERE id = $1",
                                                  self.model.bids[step.arg("coid")].bid_id)
                return None if status != "open" else "the bid is open"
            case ("deposit", "idempotency_conflict") if step.arg("conflict"):
                return None
            case ("offer_publish", "invalid_field") if field == "gpus":
                host = self.model.hosts[step.arg("host")]
                return None if step.arg("gpus") > sum(host.present) else f"the host reported {sum(host.present)} GPUs"
            case ("offer_publish", "invalid_field") if field == "firm_until" and step.arg("firm_until") is not None:
                start = step.arg("from") or self.clock()
                firm_until = step.arg("firm_until")
                return None if not start <= firm_until <= step.arg("until") else "its firm window lies inside the offer"
            case ("offer_publish", "offer_overlaps"):
                host = self.model.hosts[step.arg("host")]
                live = host.offer_id is not None and host.offer_until > (step.arg("from") or self.clock())
                return None if live else "the host has no live offer the simulation knows of"
            case ("reclaim", "invalid_field") if field == "gpus":
                return None  # more GPUs than the owner's not yet reclaimed (the simulation keeps no count)
            case ("deliver_held", "invalid_field") if "is not this host's" in refusal.message:
                # A report held back over a GPU that moved to another host meanwhile.
                host = self.model.hosts[step.arg("host")]
                moved = {host.uuids[i] for i in host.moved_out}
                return None if any(f"GPU {uuid} " in refusal.message for uuid in moved) else "no GPU of it moved"
        return "no such refusal is expected of this step"

    # --- injected crashes -------------------------------------------------------------------------

    def _crash_now(self) -> bool:
        return self.crash_rate > 0 and self.crash_rng.random() < self.crash_rate

    async def _kill_during(self, pid: int, work: asyncio.Future) -> bool:
        """Terminate backend `pid` a moment into `work` (a process dying mid-transaction: its locks go,
        its transaction rolls back); True if it died before `work` finished."""
        await asyncio.wait({work}, timeout=self.crash_rng.uniform(0, 0.015))
        if work.done():
            return False
        self.crashes += 1
        await self.pool.fetchval("SELECT pg_terminate_backend($1)", pid)
        await asyncio.wait({work})
        return True

    async def _crashing_settle(self) -> None:
        """A settlement run on a connection of its own that dies part way (or finishes first)."""
        conn = await asyncpg.connect(self.url)
        try:
            work = asyncio.ensure_future(self._settle_on(conn))
            if await self._kill_during(conn.get_server_pid(), work):
                if not work.cancelled():
                    work.exception()  # the dead connection's error: expected
            elif work.result().failed:  # done before the crash landed: an ordinary run
                raise SimFailure("every lease settles", f"{work.result().failed} leases failed to settle")
        finally:
            await conn.close()

    async def _crashing_tick(self) -> None:
        """The leader's connection dies part way into a tick: the leader gives up, a new one rebuilds
        the book from the database."""
        if not await self.leader._lead():
            return
        work = asyncio.ensure_future(self.leader.tick())
        if await self._kill_during(self.leader.conn.get_server_pid(), work):
            if not work.cancelled():
                work.exception()  # the dead connection's error (asyncpg's, whichever): expected
            await self.leader.close()
            self.leader = MatchingLeader(self.ctx, self.url, book_factory=MirroredBook)
        else:  # done before the crash landed: an ordinary tick
            summary = work.result()
            if summary is None:
                raise SimFailure("every tick runs", "the leader gave up its tick")
            await self._after_tick(summary)

    async def _crashing_ingest(self, host: HostState, report: MeterReport) -> None:
        """An agent's report whose request is cut part way (the agent sends it again after)."""
        work = asyncio.ensure_future(ingest_report(self.ctx, self._agent(host), report))
        await asyncio.wait({work}, timeout=self.crash_rng.uniform(0, 0.015))
        if not work.done():
            self.crashes += 1
            work.cancel()
        await asyncio.gather(work, return_exceptions=True)

    # --- principals -------------------------------------------------------------------------------

    def _owner(self, index: int) -> Principal:
        return Principal(role="owner", account_id=self.model.owner_ids[index])

    def _agent(self, host: HostState) -> Principal:
        return Principal(role="agent", account_id=self.model.owner_ids[host.owner], host_id=host.host_id)

    # --- setup ------------------------------------------------------------------------------------

    async def _account(self, step: Step) -> str:
        role, index = step.arg("role"), step.arg("index")
        created = await create_account(self.ctx, AccountCreate(name=f"{role}{index}", role=role))
        (self.model.owner_ids if role == "owner" else self.model.tenant_ids).append(created.id)
        return f"id={created.id}"

    async def _host(self, step: Step) -> str:
        index, owner = step.arg("host"), step.arg("owner")
        created = await create_host(self.ctx, self.model.owner_ids[owner],
                                    HostCreate(name=f"h{index}", fabric=step.arg("fabric")))
        host = HostState(name=f"h{index}", owner=owner, fabric=step.arg("fabric"),
                         uuids=[f"GPU-{created.id:04d}-{i:04d}-0000-0000" for i in range(GPUS_PER_HOST)],
                         present=[True] * GPUS_PER_HOST, host_id=created.id)
        self.model.hosts.append(host)
        await self._put_inventory(host)
        return f"id={created.id}"

    async def _put_inventory(self, host: HostState) -> None:
        await put_inventory(self.ctx, self._agent(host), Inventory(gpus=[
            InventoryGpu(uuid=u, model=MODEL, memory_mb=81559, index=i)
            for i, (u, p) in enumerate(zip(host.uuids, host.present)) if p]))

    # --- tenants ----------------------------------------------------------------------------------

    def _bid_create(self, step: Step) -> BidCreate:
        body = {k: v for k, v in step.args if k not in ("tenant", "coid", "retry", "conflict")}
        return BidCreate(client_order_id=step.arg("coid"), **body)

    def _body(self, step: Step) -> dict:
        return {k: v for k, v in step.args if k not in ("tenant", "coid", "retry", "conflict")}

    def _acknowledge(self, step: Step, bid_id: int) -> None:
        self.model.bids[step.arg("coid")] = AckedBid(coid=step.arg("coid"), tenant=step.arg("tenant"),
                                                     body=self._body(step), bid_id=bid_id)

    async def _bid(self, step: Step) -> str:
        coid = step.arg("coid")
        known = self.model.bids.get(coid)
        tenant_id = self.model.tenant_ids[step.arg("tenant")]
        try:
            bid, replayed = await place_bid(self.ctx, tenant_id, self._bid_create(step))
        except ApiError as refusal:
            # The body is validated before the client_order_id is looked up: a body refused on its
            # own (a gtd retried after its expire_at) is refused as such.
            if step.arg("conflict") and refusal.code not in ("idempotency_conflict", "invalid_field"):
                raise SimFailure("a client_order_id reused for another bid is refused as a conflict",
                                 f"got {refusal.code}: {refusal.message}") from None
            raise
        if step.arg("conflict"):
            raise SimFailure("a client_order_id reused for another bid is refused as a conflict",
                             f"answered bid {bid.id} replayed={replayed}")
        if known is not None:
            if not replayed or bid.id != known.bid_id:
                raise SimFailure("a retried bid returns the acknowledged bid",
                                 f"{coid}: acknowledged {known.bid_id}, retry answered {bid.id} replayed={replayed}")
            return f"replayed id={bid.id} {bid.status}"
        if replayed:
            raise SimFailure("a new client_order_id places a new bid", f"{coid} answered as a replay of {bid.id}")
        self._acknowledge(step, bid.id)
        return f"id={bid.id}"

    async def _cancel(self, step: Step) -> str:
        known = self.model.bids[step.arg("coid")]
        bid = await cancel_bid(self.ctx, self.model.tenant_ids[known.tenant], known.bid_id)
        if bid.status != "cancelled":
            raise SimFailure("a cancel that succeeds leaves the bid cancelled", f"bid {bid.id} is {bid.status}")
        return f"id={bid.id} cancelled"

    async def _race_bid(self, step: Step) -> str:
        """Two requests with one new client_order_id at once: one bid, answered to both, one of them
        as a replay; refused alike when refused."""
        tenant_id = self.model.tenant_ids[step.arg("tenant")]
        answers = await asyncio.gather(*(place_bid(self.ctx, tenant_id, self._bid_create(step)) for _ in range(2)),
                                       return_exceptions=True)
        refusals = [a for a in answers if isinstance(a, ApiError)]
        unexpected = [a for a in answers if isinstance(a, BaseException) and not isinstance(a, ApiError)]
        if unexpected:
            raise unexpected[0]
        if refusals:
            if len(refusals) == 2 and refusals[0].code == refusals[1].code:
                raise refusals[0]
            raise SimFailure("one client_order_id sent twice at once is one bid", [str(a) for a in answers])
        (first, first_replayed), (second, second_replayed) = answers
        if first.id != second.id or first_replayed == second_replayed:
            raise SimFailure("one client_order_id sent twice at once is one bid",
                             {"ids": (first.id, second.id), "replayed": (first_replayed, second_replayed)})
        self._acknowledge(step, first.id)
        return f"id={first.id} (twice at once)"

    async def _race_deposit(self, step: Step) -> str:
        tenant, key, amount = step.arg("tenant"), step.arg("key"), step.arg("amount")
        answers = await asyncio.gather(*(deposit(self.ctx, self.model.tenant_ids[tenant],
                                                 DepositCreate(amount=amount, idempotency_key=key)) for _ in range(2)))
        (first, first_replayed), (second, second_replayed) = answers
        if first.id != second.id or first_replayed == second_replayed:
            raise SimFailure("one deposit key sent twice at once credits once",
                             {"ids": (first.id, second.id), "replayed": (first_replayed, second_replayed)})
        self.model.deposits[(tenant, key)] = (amount, first.id)
        return f"id={first.id} (twice at once)"

    async def _held_bid_tick(self, step: Step) -> str:
        """BEGIN; insert the bid and its hold; tick while it is open; COMMIT (when the tick ends, or
        as soon as it waits on this transaction's locks)."""
        tenant_id = self.model.tenant_ids[step.arg("tenant")]
        tx = self.side.transaction()
        await tx.start()
        try:
            row, _ = await insert_bid(self.side, self.ctx, tenant_id, self._bid_create(step), self.clock())
        except BaseException:
            await tx.rollback()
            raise
        how = await self._tick_racing(tx)
        self._acknowledge(step, row["id"])
        return f"id={row['id']} committed {how}"

    async def _held_cancel_tick(self, step: Step) -> str:
        known = self.model.bids[step.arg("coid")]
        tx = self.side.transaction()
        await tx.start()
        try:
            await cancel_bid_on(self.side, self.model.tenant_ids[known.tenant], known.bid_id, self.clock())
        except BaseException:
            await tx.rollback()
            raise
        how = await self._tick_racing(tx)
        return f"id={known.bid_id} cancelled, committed {how}"

    async def _tick_racing(self, tx) -> str:
        side_pid = self.side.get_server_pid()
        task = asyncio.ensure_future(self.leader.tick())
        how = "after the tick"
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=0.003)
                if done:
                    break
                waiting = await self.pool.fetchval(
                    "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE datname = current_database()"
                    " AND $1 = ANY(pg_blocking_pids(pid)))", side_pid)
                if waiting:
                    how = "while the tick waited on it"
                    break
        finally:
            await tx.commit()
        summary = await task
        if summary is None:
            raise SimFailure("every tick runs", "the leader gave up its tick")
        await self._after_tick(summary)
        return how

    async def _deposit(self, step: Step) -> str:
        tenant, key, amount = step.arg("tenant"), step.arg("key"), step.arg("amount")
        known = self.model.deposits.get((tenant, key))
        try:
            made, replayed = await deposit(self.ctx, self.model.tenant_ids[tenant],
                                           DepositCreate(amount=amount, idempotency_key=key))
        except ApiError as refusal:
            if step.arg("conflict") and refusal.code != "idempotency_conflict":
                raise SimFailure("a deposit key reused for another amount is refused as a conflict",
                                 f"got {refusal.code}") from None
            raise
        if step.arg("conflict"):
            raise SimFailure("a deposit key reused for another amount is refused as a conflict",
                             f"answered deposit {made.id} replayed={replayed}")
        if known is not None:
            if not replayed or made.id != known[1]:
                raise SimFailure("a retried deposit returns the first deposit and moves nothing",
                                 f"key {key}: first {known[1]}, retry answered {made.id} replayed={replayed}")
            return f"replayed id={made.id}"
        if replayed:
            raise SimFailure("a new deposit key credits", f"key {key} answered as a replay")
        self.model.deposits[(tenant, key)] = (amount, made.id)
        return f"id={made.id}"

    # --- owners -----------------------------------------------------------------------------------

    async def _offer_publish(self, step: Step) -> str:
        host = self.model.hosts[step.arg("host")]
        offer = await create_offer(self.ctx, self._owner(host.owner), OfferCreate(
            host_id=host.host_id, gpus=step.arg("gpus"), floor_price=step.arg("floor"),
            available_until=step.arg("until"), available_from=step.arg("from"), firm_until=step.arg("firm_until"),
            reclaim_notice_s=step.arg("notice_s"), reclaim_rate_per_h=step.arg("rate_per_h", 0.0), model=MODEL))
        host.offer_id, host.offer_until = offer.id, offer.available_until
        return f"id={offer.id}"

    async def _offer_withdraw(self, step: Step) -> str:
        host = self.model.hosts[step.arg("host")]
        offer = await withdraw_offer(self.ctx, self._owner(host.owner), host.offer_id)
        host.offer_id = None
        return f"id={offer.id} {offer.status}"

    async def _inventory(self, step: Step) -> str:
        """The agent reports its GPUs with one dropped or one restored. A plain drop takes a GPU no
        live lease holds (the `drop`-th such, counting round); `leased=True` drops the `drop`-th
        present GPU whatever holds it (a GPU failing under a lease)."""
        host = self.model.hosts[step.arg("host")]
        if step.arg("drop") is None:
            host.present[step.arg("restore")] = True
        else:
            present = [i for i, p in enumerate(host.present) if p]
            if not step.arg("leased"):
                held = {r["uuid"] for r in await self.pool.fetch(
                    "SELECT uuid FROM lease_gpus WHERE live AND uuid = ANY($1::text[])", host.uuids)}
                present = [i for i in present if host.uuids[i] not in held]
            if not present:
                return "no GPU to drop"
            host.present[present[step.arg("drop") % len(present)]] = False
        await self._put_inventory(host)
        return f"{sum(host.present)} GPUs present"

    async def _move_gpu(self, step: Step) -> str:
        """Another owner's host reports a GPU of `source` as its own. The exchange must take it if and
        only if its host has dropped it and no live lease holds it; refused, nothing changes."""
        source, target = self.model.hosts[step.arg("source")], self.model.hosts[step.arg("target")]
        index = step.arg("index")
        if index in source.moved_out:
            return "moved already"
        uuid = source.uuids[index]
        before = await self.pool.fetchrow(
            "SELECT host_id, present, EXISTS (SELECT 1 FROM lease_gpus lg WHERE lg.uuid = g.uuid AND lg.live) AS leased"
            " FROM gpus g WHERE uuid = $1", uuid)
        free = before["host_id"] == source.host_id and not before["present"] and not before["leased"]
        target.uuids.append(uuid)
        target.present.append(True)
        try:
            await self._put_inventory(target)
        except ApiError as refusal:
            target.uuids.pop()
            target.present.pop()
            after = await self.pool.fetchrow("SELECT host_id, present FROM gpus WHERE uuid = $1", uuid)
            if free or refusal.code != "gpu_on_other_host" or uuid not in refusal.message \
                    or tuple(after) != (before["host_id"], before["present"]):
                raise SimFailure("a GPU moves to another host once released and not leased, else is refused "
                                 "without effect", {"uuid": uuid, "before": dict(before), "refusal": refusal.code,
                                                    "after": dict(after)}) from None
            return f"refused {refusal.code}"
        if not free:
            raise SimFailure("a GPU moves to another host once released and not leased, else is refused "
                             "without effect", {"uuid": uuid, "before": dict(before), "taken": True})
        source.moved_out.add(index)
        target.joined_at[len(target.uuids) - 1] = self.clock()
        return f"{uuid} moved to host {target.host_id}"

    async def _reclaim(self, step: Step) -> str:
        owner = step.arg("owner")
        host = step.arg("host")
        reclaim = await create_reclaim(self.ctx, self._owner(owner), ReclaimCreate(
            model=MODEL, gpus=step.arg("gpus"), host_id=None if host is None else self.model.hosts[host].host_id,
            at=step.arg("at"), until=step.arg("until")))
        self.model.reclaims.append((owner, reclaim.id))
        return f"id={reclaim.id} {reclaim.status} leases={len(reclaim.leases)} shortfall={reclaim.shortfall}"

    async def _release(self, step: Step) -> str:
        owner, reclaim_id = self.model.reclaims[step.arg("index")]
        reclaim = await release_reclaim(self.ctx, self._owner(owner), reclaim_id)
        return f"id={reclaim.id} {reclaim.status}"

    # --- agents -----------------------------------------------------------------------------------

    def _report(self, host: HostState, until: datetime, healthy: bool = True) -> MeterReport | None:
        """The agent's next report: samples every SAMPLE_EVERY_S from where it stopped up to `until`."""
        agent = host.agent
        samples = []
        ts = agent.sampled_until
        while ts <= until:
            elapsed = int((ts - START).total_seconds())
            samples.extend(MeterSample(uuid=u, ts=ts, util=90, mem_used_mb=70_000, power_mw=650_000,
                                       energy_mj=1_000_000 + elapsed * 650_000, temp_c=70, healthy=healthy)
                           for i, (u, present) in enumerate(zip(host.uuids, host.present))
                           if present and ts >= host.joined_at.get(i, START))
            ts += timedelta(seconds=SAMPLE_EVERY_S)
        agent.sampled_until = ts
        if not samples:
            return None
        report = MeterReport(seq=agent.next_seq, samples=samples)
        agent.next_seq += 1
        return report

    async def _send(self, host: HostState, report: MeterReport, *, duplicate: bool = False) -> str:
        crashed = not duplicate and self._crash_now()
        if crashed:
            await self._crashing_ingest(host, report)
        ack = await ingest_report(self.ctx, self._agent(host), report)
        if crashed and ack.duplicate:  # the cut request had committed: this resend is its duplicate
            duplicate = True
            self.billing.stored(host.host_id, [(x.uuid, x.ts, x.healthy) for x in report.samples])
        if ack.duplicate != duplicate:
            raise SimFailure("a report is stored once: its resend is a duplicate, a new one is not",
                             f"host {host.name} seq {report.seq}: duplicate={ack.duplicate}")
        if not duplicate and (ack.refused or ack.accepted != len(report.samples)):
            raise SimFailure("every valid sample of a report is accepted",
                             f"host {host.name} seq {report.seq}: {len(report.samples)} sent, {ack.accepted} accepted,"
                             f" {ack.refused} refused {ack.refused_reasons}")
        if not duplicate:
            self.billing.stored(host.host_id, [(x.uuid, x.ts, x.healthy) for x in report.samples])
        host.agent.last_sent = report
        return f"seq {report.seq}: {ack.accepted}"

    async def _meter(self, step: Step) -> str:
        host = self.model.hosts[step.arg("host")]
        mode, now = step.arg("mode"), self.clock()
        if mode == "swap":  # two reports of halves of the window, the later one delivered first
            middle = host.agent.sampled_until + (now - host.agent.sampled_until) / 2
            first = self._report(host, middle, step.arg("healthy"))
            second = self._report(host, now, step.arg("healthy"))
            sent = [await self._send(host, r) for r in (second, first) if r is not None]
            return "; ".join(sent) or "nothing to report"
        report = self._report(host, now, step.arg("healthy"))
        if report is None:
            return "nothing to report"
        if mode == "hold":
            host.agent.held.append(report)
            return f"seq {report.seq} held back"
        outcome = await self._send(host, report)
        if mode == "duplicate":
            outcome += "; resent: " + await self._send(host, report, duplicate=True)
        return outcome

    async def _deliver_held(self, step: Step) -> str:
        host = self.model.hosts[step.arg("host")]
        return "late " + await self._send(host, host.agent.held.pop(0))

    async def _host_silent(self, step: Step) -> str:
        self.model.hosts[step.arg("host")].agent.silent = True
        return "silent"

    async def _host_returns(self, step: Step) -> str:
        host = self.model.hosts[step.arg("host")]
        host.agent.silent = False
        if not step.arg("backfill"):  # the host was down: no samples for the outage exist
            host.agent.sampled_until = max(host.agent.sampled_until, self.clock())
        report = self._report(host, self.clock())
        return await self._send(host, report) if report is not None else "nothing to report"

    # --- the exchange's jobs ----------------------------------------------------------------------

    async def _after_tick(self, summary) -> None:
        self.ticked = True
        self.last_tick_at = self.clock()
        for model, state in sorted(self.leader.sync.models.items()):
            if state.book.disagreements:
                raise SimFailure("each tick clears as matching.reference does on the same book",
                                 [{"model": model, **d} for d in state.book.disagreements[:3]])
        # The prices the tick published: what the billing model takes as the spot price in force.
        for row in await self.pool.fetch("SELECT market, price, competing_limit FROM market_ticks"
                                         " WHERE id = ANY($1::bigint[]) ORDER BY id", list(summary.tick_ids.values())):
            self.billing.ticked(row["market"], row["price"], row["competing_limit"])

    async def _do_tick(self) -> str:
        if self._crash_now():
            await self._crashing_tick()  # then a tick as usual, by the leader now in place
        summary = await self.leader.tick()
        if summary is None:
            raise SimFailure("every tick runs", "the leader gave up its tick")
        await self._after_tick(summary)
        self.book_fresh = True
        return f"fills={summary.fills} leases={summary.leases} ended={summary.ended} outbid={summary.outbid}"

    async def _settle_on(self, conn: asyncpg.Connection):
        return await settle(conn, self.clock(), fee_bps=self.settings.fee_bps, max_gap_s=self.settings.meter_max_gap_s,
                            close_after_s=self.settings.settle_close_after_s)

    async def _settle_once(self):
        async with self.pool.acquire() as conn:
            return await self._settle_on(conn)

    async def _do_settle(self, runs: int = 1) -> str:
        """`runs` settlement runs at once at this moment: they bill as one run (one holds the lock, a
        later one finds nothing more to bill)."""
        facts = [dict(r) for r in await self.pool.fetch(LEASE_FACTS_SQL)]
        if self._crash_now():
            await self._crashing_settle()  # then restarted: the run below bills what it did not
        summaries = await asyncio.gather(*(self._settle_once() for _ in range(runs)))
        summary = max(summaries, key=lambda s: s.leases)
        self.last_settle_at = self.clock()
        if any(s.failed for s in summaries):
            raise SimFailure("every lease settles", f"{[s.failed for s in summaries]} leases failed to settle")
        self.billing.settle(facts, self.clock())
        await self._check_billing()
        return f"settled {summary.leases} billed {summary.billed} charged {summary.charged_micros} closed {summary.closed}"

    async def _check_billing(self) -> None:
        """After a settlement run: every lease's billed seconds and money, every account's balances
        and the fees book equal the billing model's, to the micro-dollar."""
        stored = {r["id"]: r for r in await self.pool.fetch(
            "SELECT id, account_id, host_id, billed_gpu_s, billed_amount, fees_amount, hold_amount, closed FROM leases")}
        for lease_id, money in self.billing.leases.items():
            row = stored[lease_id]
            got = (row["billed_gpu_s"], row["billed_amount"], row["fees_amount"], row["hold_amount"], row["closed"])
            want = (money.billed_gpu_s, money.billed, money.fees, money.hold, money.closed)
            if got != want:
                raise SimFailure("settlement bills each lease what the billing model says, to the micro-dollar",
                                 {"lease": lease_id, "(GPU-s, billed, fees, hold, closed)": got, "model": want})
        if any(lease_id not in self.billing.leases for lease_id in stored):
            return  # a lease this run did not see (none: settlement runs between ticks); balances need all
        owners = {r["id"]: r["owner_id"] for r in await self.pool.fetch("SELECT id, owner_id FROM hosts")}
        bids = {acked.bid_id: acked for acked in self.model.bids.values()}
        expected: Counter[tuple[int | None, str]] = Counter({(None, "fees"): 0})
        for (tenant, _), (amount, _) in self.model.deposits.items():
            expected[(self.model.tenant_ids[tenant], "available")] += micros(amount)
        for row in await self.pool.fetch("SELECT id, account_id FROM bids WHERE status = 'open'"):
            hold = bid_hold_micros(bids[row["id"]].body)
            expected[(row["account_id"], "held")] += hold
            expected[(row["account_id"], "available")] -= hold
        for lease_id, row in stored.items():
            money = self.billing.leases[lease_id]
            tenant, owner = row["account_id"], owners[row["host_id"]]
            expected[(tenant, "held")] += money.hold
            expected[(tenant, "available")] -= money.hold + money.billed
            expected[(owner, "available")] += money.billed - money.fees
            expected[(None, "fees")] += money.fees
        got = {(r["account_id"], r["kind"]): r["balance"] for r in await self.pool.fetch(
            "SELECT account_id, kind, balance FROM ledger_accounts WHERE kind <> 'world'")}
        wrong = {key: (got.get(key, 0), value) for key, value in expected.items() if got.get(key, 0) != value}
        wrong.update({key: (value, 0) for key, value in got.items() if value and key not in expected})
        if wrong:
            raise SimFailure("every balance and the fees book equal the billing model's",
                             {"(account, book)": {f"{k[0]}/{k[1]}": f"stored {v[0]}, model {v[1]}" for k, v in wrong.items()}})

    async def _tick(self, step: Step) -> str:
        return await self._do_tick()

    async def _settle(self, step: Step) -> str:
        return await self._do_settle()

    async def _race_settle(self, step: Step) -> str:
        return "two at once: " + await self._do_settle(runs=2)

    async def _advance(self, step: Step) -> str:
        self.clock.advance(step.arg("s"))
        now = self.model.now = self.clock()
        outcomes = []
        for host in self.model.hosts:  # running agents report what they sampled meanwhile, less
            if not host.agent.silent:  # their last batch (left for the meter steps)
                report = self._report(host, now - timedelta(seconds=SAMPLE_EVERY_S))
                if report is not None:
                    await self._send(host, report)
        if (now - self.last_tick_at).total_seconds() >= self.settings.tick_s:
            outcomes.append("tick " + await self._do_tick())
        if (now - self.last_settle_at).total_seconds() >= self.settings.settle_s:
            outcomes.append(await self._do_settle())
            self.book_fresh = False  # settlement may requeue bids after the tick
        return "; ".join(outcomes) or "quiet"

    async def _restart_leader(self, step: Step) -> str:
        await self.leader.close()
        self.leader = MatchingLeader(self.ctx, self.url, book_factory=MirroredBook)
        return "new leader (book rebuilt at its first tick)"


def acknowledged_deposits(model: SimModel) -> dict[int, int]:
    """Per tenant account id: the micro-dollars of every deposit the exchange acknowledged."""
    totals: dict[int, int] = {}
    for (tenant, _), (amount, _) in model.deposits.items():
        account = model.tenant_ids[tenant]
        totals[account] = totals.get(account, 0) + parse_money(amount)
    return totals
