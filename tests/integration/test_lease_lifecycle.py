"""The lease lifecycle (exchange/leases/lifecycle.py): its table, the schema checked against it, and
the defects of the review that were lifecycle bugs — each test here failed before its fix."""
from __future__ import annotations

import re
from datetime import timedelta


from exchange.leases import lifecycle
from exchange.leases.lifecycle import (PREEMPTION_REASONS, TERMINAL, TRANSITIONS, EndReason, LeaseEvent, LeaseStatus,
                                       fail_silent_hosts, transition)
from exchange.reclaims.schemas import ReclaimCreate
from exchange.reclaims.service import create_reclaim
from tests.integration.scenario import START, Scenario, owner


async def lease_rows(s: Scenario) -> list[dict]:
    return [dict(r) for r in await s.ctx.pool.fetch("SELECT * FROM leases ORDER BY id")]


def _quoted(text: str) -> set[str]:
    return set(re.findall(r"'([a-z_]+)'", text))


# --- the table and the schema -----------------------------------------------------------------------

def test_terminal_statuses_take_no_event_and_notices_only_from_active() -> None:
    for status in TERMINAL:
        for event in LeaseEvent:
            assert transition(status, event) is None
    assert transition(LeaseStatus.ENDING, LeaseEvent.OUTBID) is None  # one notice only
    assert transition(LeaseStatus.ENDING, LeaseEvent.RECLAIM) is None
    assert transition(LeaseStatus.ENDING, LeaseEvent.DUE) == (LeaseStatus.ENDED, None)  # keeps its reason
    assert transition(LeaseStatus.ACTIVE, LeaseEvent.DUE) == (LeaseStatus.ENDED, EndReason.COMPLETED)
    reasons = {reason for _, reason in TRANSITIONS.values() if reason is not None}
    assert reasons == set(EndReason)
    assert EndReason.COMPLETED not in PREEMPTION_REASONS


async def test_schema_checks_and_preemption_trigger_match_the_module(db) -> None:
    end_reason = await db.fetchval("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'leases_end_reason'")
    assert _quoted(end_reason) == {str(r) for r in EndReason}
    status = await db.fetchval("SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                               " WHERE conrelid = 'leases'::regclass AND pg_get_constraintdef(oid) LIKE '%status = ANY%'"
                               " AND conname <> 'leases_status_shape'")
    assert _quoted(status) == {str(s) for s in LeaseStatus}
    trigger = await db.fetchval("SELECT pg_get_triggerdef(oid) FROM pg_trigger WHERE tgname = 'leases_preempted'")
    when = trigger[trigger.index("WHEN"):]
    assert _quoted(when) - {"spot"} == {str(r) for r in PREEMPTION_REASONS}
    # Under notice only for the reasons a notice is given for.
    shape = await db.fetchval("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'leases_status_shape'")
    ending = shape[shape.index("'ending'"):shape.index("'ended'")]
    notices = {TRANSITIONS[(LeaseStatus.ACTIVE, e)][1] for e in (LeaseEvent.OUTBID, LeaseEvent.RECLAIM)}
    assert _quoted(ending) - {"ending"} == {str(r) for r in notices}


async def test_triggers_stamp_events_with_the_injected_clock(s: Scenario) -> None:
    await s.market(gpus=8)
    s.clock.advance(86400)  # months away from the server's own time (2026-05 here)
    await s.bid(market="H100-80GB/spot", gpus=2, duration_s=3600, limit="2.00")
    await s.tick()
    at = await s.ctx.pool.fetchval("SELECT max(at) FROM account_events")
    assert at == s.clock()


# --- defect 3: reclaims take leases that already completed ------------------------------------------

async def test_scheduled_reclaim_never_takes_a_lease_that_completed(s: Scenario) -> None:
    await s.market(gpus=8)
    await s.bid(market="H100-80GB/spot", gpus=8, duration_s=600, limit="2.00", requeue_on_preempt=True)
    await s.tick()
    # A reservation for the whole host, coming due after the lease's planned end.
    await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=8, at=START + timedelta(seconds=620)))
    s.clock.advance(650)  # one tick late: the lease is due and the reservation too
    await s.tick()
    (lease,) = await lease_rows(s)
    assert (lease["status"], lease["end_reason"], lease["free_of_charge"]) == ("ended", "completed", False)
    assert lease["end_at"] == lease["planned_end_at"] and lease["reclaim_id"] is None
    assert await s.ctx.pool.fetchval("SELECT count(*) FROM market_preemptions") == 0


async def test_api_reclaim_between_ticks_never_takes_a_lease_that_completed(s: Scenario) -> None:
    await s.market(gpus=8)
    await s.bid(market="H100-80GB/spot", gpus=8, duration_s=600, limit="2.00", requeue_on_preempt=True)
    await s.tick()
    s.clock.advance(605)  # past its planned end; no tick has ended it yet
    reclaim = await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=8))
    (lease,) = await lease_rows(s)
    assert (lease["status"], lease["end_reason"], lease["reclaim_id"]) == ("ended", "completed", None)
    assert reclaim.leases == [] and reclaim.taken_free == 8 and reclaim.shortfall == 0


# --- defect 5: an outbid notice can run past the lease's planned end --------------------------------

async def test_outbid_notice_never_runs_past_the_planned_end(s: Scenario) -> None:
    await s.market(gpus=8)  # the offer's reclaim notice: 120 s
    await s.bid(market="H100-80GB/spot", gpus=8, duration_s=600, limit="2.00")
    await s.tick()
    s.clock.advance(540)  # 60 s left: less than the notice
    rich = await s.new_tenant("rich")
    await s.bid(market="H100-80GB/spot", gpus=8, duration_s=600, limit="5.00", tenant=rich, coid="rich")
    await s.tick()
    (lease,) = await lease_rows(s)
    assert lease["status"] == "active" and lease["end_at"] is None  # it completes as planned
    s.clock.advance(60)
    await s.tick()
    first, second = await lease_rows(s)
    assert (first["status"], first["end_reason"], first["end_at"]) == ("ended", "completed", first["planned_end_at"])
    assert second["account_id"] == rich and second["status"] == "active"


async def test_outbid_with_time_left_gets_the_full_notice(s: Scenario) -> None:
    await s.market(gpus=8)
    await s.bid(market="H100-80GB/spot", gpus=8, duration_s=3600, limit="2.00")
    await s.tick()
    rich = await s.new_tenant("rich")
    await s.bid(market="H100-80GB/spot", gpus=8, duration_s=600, limit="5.00", tenant=rich, coid="rich")
    await s.tick()
    (lease,) = await lease_rows(s)
    assert (lease["status"], lease["end_reason"]) == ("ending", "outbid")
    assert lease["end_at"] == s.clock() + timedelta(seconds=120) <= lease["planned_end_at"]


# --- defect 10: host failure rewrites leases that already ended -------------------------------------

async def test_host_failure_never_rewrites_a_lease_whose_notice_ran_out(s: Scenario) -> None:
    await s.market(gpus=8)
    await s.bid(market="H100-80GB/spot", gpus=8, duration_s=3600, limit="2.00")
    await s.tick()
    (lease,) = await lease_rows(s)
    await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=8))
    s.clock.advance(300)
    await s.report(1, lease["gpu_uuids"], START, 300)  # the host reports past the notice's end (120 s)...
    s.clock.advance(400)  # ...then goes silent past the failure grace, with no tick in between
    async with s.ctx.pool.acquire() as conn:
        await fail_silent_hosts(conn, s.clock(), grace_s=30, fail_s=300)
    (after,) = await lease_rows(s)
    assert (after["status"], after["end_reason"]) == ("ended", "reclaimed")
    assert after["end_at"] == START + timedelta(seconds=120)


# --- defect 4 (second half): a lease that fails on one host of a gang leaves the others running ------

async def test_a_gang_member_failing_ends_the_whole_gang(s: Scenario) -> None:
    await s.market(gpus=4)
    h2, uuids2 = await s.add_host("h2", gpus=4, floor="1.00")
    await s.bid(market="H100-80GB/spot", gpus=8, duration_s=3600, limit="2.00", requeue_on_preempt=True)
    await s.tick()
    assert len(await lease_rows(s)) == 2
    s.clock.advance(500)
    await s.report(1, s.uuids, START, 100)          # host 1 went silent after 100 s
    await s.report(1, uuids2, START, 500, agent=h2)  # host 2 kept reporting
    async with s.ctx.pool.acquire() as conn:
        assert await fail_silent_hosts(conn, s.clock(), grace_s=30, fail_s=300) == 1
    first, second = await lease_rows(s)
    last_sample = START + timedelta(seconds=99)
    assert (first["status"], first["end_reason"], first["end_at"]) == ("failed", "host_failed", last_sample)
    assert (second["status"], second["end_reason"], second["end_at"]) == ("ended", "gang_failed", last_sample)
    assert await s.ctx.pool.fetchval("SELECT count(*) FROM lease_gpus WHERE live") == 0


# --- defect 7: a reclaim racing a tick takes the idle GPUs the tick is assigning ----------------------

async def test_reclaim_committed_during_a_tick_keeps_its_gpus(s: Scenario) -> None:
    await s.market(gpus=8)
    bid = await s.bid(market="H100-80GB/spot", gpus=8, duration_s=3600, limit="2.00")
    load_incumbents = s.sync.load_incumbents

    async def reclaim_after_the_book_loaded(conn):
        # The tick has read the blocks (8 free GPUs); the owner's reclaim commits before it persists.
        await load_incumbents(conn)
        await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=8))

    s.sync.load_incumbents = reclaim_after_the_book_loaded
    await s.tick()
    s.sync.load_incumbents = load_incumbents
    assert await lease_rows(s) == []
    status = await s.ctx.pool.fetchval("SELECT status FROM bids WHERE id = $1", bid.id)
    assert status == "open"
    assert bid.id in s.sync.models["H100-80GB"].resting  # not vanished from the book either
    s.clock.advance(10)
    await s.tick()
    assert await lease_rows(s) == []  # the GPUs stay the owner's


async def test_lifecycle_writers_ignore_leases_they_do_not_apply_to(s: Scenario) -> None:
    await s.market(gpus=8)
    await s.bid(market="H100-80GB/spot", gpus=8, duration_s=600, limit="2.00")
    await s.tick()
    (lease,) = await lease_rows(s)
    s.clock.advance(700)
    async with s.ctx.pool.acquire() as conn:
        assert await lifecycle.end_due(conn, s.clock()) == [lease["id"]]
        assert await lifecycle.end_due(conn, s.clock()) == []
        assert await lifecycle.give_notice(conn, [lease["id"]], LeaseEvent.OUTBID, s.clock()) == []
    (after,) = await lease_rows(s)
    assert (after["status"], after["end_reason"]) == ("ended", "completed")


async def test_bid_statuses_match_the_bid_lifecycle(db) -> None:
    from exchange.bids.lifecycle import TRANSITIONS as BID_TRANSITIONS, BidStatus

    check = await db.fetchval("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conrelid = 'bids'::regclass"
                              " AND pg_get_constraintdef(oid) LIKE '%status = ANY%'")
    assert _quoted(check) == {str(s) for s in BidStatus}
    assert {s for s, _ in BID_TRANSITIONS} | set(BID_TRANSITIONS.values()) == set(BidStatus)


# --- found by the simulation (gpux sim) ---------------------------------------------------------------

async def test_releasing_a_reservation_before_its_time_cancels_it(s: Scenario) -> None:
    from exchange.reclaims.service import release_reclaim

    await s.market(gpus=8)
    reclaim = await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=4,
                                                                  at=START + timedelta(hours=1)))
    released = await release_reclaim(s.ctx, owner(s), reclaim.id)  # failed with a CHECK violation (500)
    assert released.status == "released" and released.until is None


async def test_a_reclaim_victim_that_completes_within_its_notice_is_counted_once(s: Scenario) -> None:
    from exchange.ledger.audit import run_audit

    await s.market(gpus=8)
    await s.bid(market="H100-80GB/spot", gpus=8, duration_s=600, limit="2.00")
    await s.tick()
    s.clock.advance(550)  # 50 s left, the notice is 120 s
    reclaim = await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=8))
    (lease,) = await lease_rows(s)
    assert (lease["status"], lease["reclaim_id"]) == ("active", reclaim.id)  # untold, but the reclaim's
    assert [le.end_at for le in reclaim.leases] == [lease["planned_end_at"]] and reclaim.shortfall == 0
    async with s.ctx.pool.acquire() as conn:
        assert await run_audit(conn, now=s.clock()) == []
    await s.bid(market="H100-80GB/spot", gpus=1, duration_s=600, limit="9.00", coid="later")
    await s.tick()
    s.clock.advance(60)
    await s.tick()  # the victim completed: its GPUs are the owner's, not for sale
    statuses = [(le["status"], le["end_reason"]) for le in await lease_rows(s)]
    assert statuses == [("ended", "completed")]
    async with s.ctx.pool.acquire() as conn:
        assert await run_audit(conn, now=s.clock()) == []


async def test_a_gang_sibling_never_ends_before_what_it_was_billed(s: Scenario) -> None:
    from exchange.ledger.audit import run_audit
    from exchange.settlement.service import settle

    await s.market(gpus=4)
    h2, uuids2 = await s.add_host("h2", gpus=4, floor="1.00")
    await s.bid(market="H100-80GB/spot", gpus=8, duration_s=3600, limit="2.00")
    await s.tick()
    s.clock.advance(250)
    await s.report(1, s.uuids, START, 100)          # host 1 went silent after 100 s
    await s.report(1, uuids2, START, 250, agent=h2)  # host 2 kept reporting, and was billed for it
    async with s.ctx.pool.acquire() as conn:
        await settle(conn, s.clock(), fee_bps=0, max_gap_s=5.0, close_after_s=30)
    s.clock.advance(200)
    async with s.ctx.pool.acquire() as conn:
        assert await fail_silent_hosts(conn, s.clock(), grace_s=30, fail_s=300) == 1
        failed, sibling = await lease_rows(s)
        assert (sibling["status"], sibling["end_reason"]) == ("ended", "gang_failed")
        assert sibling["billed_gpu_s"] == 4 * 249
        assert sibling["end_at"] == START + timedelta(seconds=249)  # not back at its partner's 99 s
        assert await run_audit(conn, now=s.clock()) == []


async def test_a_gtd_bid_retried_after_its_expiry_answers_with_the_stored_bid(s: Scenario) -> None:
    await s.market(gpus=8)
    first = await s.bid(market="H100-80GB/spot", gpus=8, duration_s=600, limit="0.50", coid="gtd",
                        expire_at=START + timedelta(seconds=30))
    s.clock.advance(60)
    await s.tick()
    again = await s.bid(market="H100-80GB/spot", gpus=8, duration_s=600, limit="0.50", coid="gtd",
                        expire_at=START + timedelta(seconds=30))
    assert again.id == first.id and again.status == "expired"


async def test_a_reclaim_counts_only_the_gpus_its_victims_host_still_has(s: Scenario) -> None:
    from exchange.hosts.schemas import Inventory, InventoryGpu
    from exchange.hosts.service import put_inventory
    from exchange.ledger.audit import run_audit

    await s.market(gpus=5)
    await s.bid(market="H100-80GB/spot", gpus=4, duration_s=3600, limit="2.00", coid="a")  # GPUs 0-3
    await s.tick()
    await s.bid(market="H100-80GB/spot", gpus=1, duration_s=3600, limit="2.00", coid="b")  # GPU 4
    await s.tick()
    s.clock.advance(10)
    await put_inventory(s.ctx, s.agent, Inventory(gpus=[  # one of a's GPUs falls off the bus
        InventoryGpu(uuid=u, model="H100-80GB", memory_mb=81559) for u in s.uuids[1:]]))
    s.clock.advance(10)
    reclaim = await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=4))
    # a gives back the 3 GPUs that exist, so b goes too (was: a counted as 4, b kept: 5 on 4 GPUs).
    assert (len(reclaim.leases), reclaim.shortfall) == (2, 0)
    async with s.ctx.pool.acquire() as conn:
        assert await run_audit(conn, now=s.clock()) == []


async def test_a_reclaim_of_a_gang_whose_gpus_left_one_host_takes_from_the_other(s: Scenario) -> None:
    from exchange.hosts.schemas import Inventory, InventoryGpu
    from exchange.hosts.service import put_inventory

    await s.market(gpus=4, floor="1.50")
    h2, _ = await s.add_host("h2", gpus=4, floor="1.00")  # cheaper: the gang's first lease lands here
    await s.bid(market="H100-80GB/spot", gpus=8, duration_s=3600, limit="3.00")
    await s.tick()
    s.clock.advance(10)
    await put_inventory(s.ctx, h2, Inventory(gpus=[  # the gang's GPUs on h2 all leave; a new one comes
        InventoryGpu(uuid="GPU-new", model="H100-80GB", memory_mb=81559)]))
    await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=1, host_id=h2.host_id))  # GPU-new
    s.clock.advance(10)
    # Was a 500: the lease on h2 gave 0 GPUs, written as a reclaim_gpus row of 0 (gpux sim seed 831).
    reclaim = await create_reclaim(s.ctx, owner(s), ReclaimCreate(model="H100-80GB", gpus=4))
    assert reclaim.shortfall == 0 and reclaim.taken_free == 0 and len(reclaim.leases) == 2
    assert await s.ctx.pool.fetchval("SELECT array_agg(gpus) FROM reclaim_gpus WHERE reclaim_id = $1",
                                     reclaim.id) == [4]
