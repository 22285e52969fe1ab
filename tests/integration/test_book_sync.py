"""The matching leader's book equals the database, under any commit order: changes committed late
are loaded, winners that could not be persisted come back, leases on a republished offer's host
and hosts that stopped reporting are not sold again, and a new leader rebuilds the same book."""
from __future__ import annotations

from datetime import timedelta

import numpy as np

from exchange.auction.book_sync import BookSync
from exchange.auction.leader import MatchingLeader
from exchange.bids.schemas import BidCreate
from exchange.bids.service import cancel_bid_on, insert_bid
from exchange.core import metrics
from exchange.leases.lifecycle import fail_silent_hosts
from exchange.offers.schemas import OfferCreate
from exchange.offers.service import create_offer, withdraw_offer
from matching import Tier
from tests.integration.scenario import START, Scenario, owner

MODEL = "H100-80GB"
SPOT, FIRM = f"{MODEL}/spot", f"{MODEL}/firm"


async def status(s: Scenario, bid_id: int) -> str:
    return await s.ctx.pool.fetchval("SELECT status FROM bids WHERE id = $1", bid_id)


async def drift(s: Scenario, sync: BookSync | None = None) -> tuple[list[int], list[int]]:
    async with s.ctx.pool.acquire() as conn:
        return await (sync or s.sync).book_drift(conn)


def in_engine(s: Scenario, bid_id: int) -> bool:
    return bid_id in s.sync.engine_bids()


async def test_book_drift_is_empty_after_ticks_and_names_a_bid_missing_from_the_book(s: Scenario) -> None:
    await s.market(gpus=8, floor="1.00")
    first = await s.bid(market=SPOT, gpus=8, duration_s=3600, limit="2.00", coid="a")
    await s.bid(market=SPOT, gpus=8, duration_s=3600, limit="1.50", coid="b")
    await s.tick()
    assert await status(s, first.id) == "filled"
    assert await drift(s) == ([], [])

    # A bid placed after the last load is pending, not drift.
    await s.bid(market=SPOT, gpus=1, duration_s=3600, limit="1.50", coid="c")
    assert await drift(s) == ([], [])

    # The engine loses a resting bid behind the sync's back: the database has it open.
    state = s.sync.models[MODEL]
    lost = next(iter(state.resting))
    state.book.remove_bids(state.resting[lost], [lost])
    assert await drift(s) == ([lost], [])


async def test_a_bid_committed_after_a_later_numbered_one_was_loaded_still_trades(s: Scenario) -> None:
    # Arrange: the slow bid takes its change number first, inside a transaction left open; a second
    # tenant's bid takes a later number, commits, and a tick loads it.
    await s.market(gpus=8, floor="1.00")
    other = await s.new_tenant("other")
    async with s.ctx.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        slow, _ = await insert_bid(conn, s.ctx, s.tenant_id, BidCreate(
            market=SPOT, gpus=4, duration_s=3600, limit_price="2.00", client_order_id="slow"), s.clock())
        fast = await s.bid(market=SPOT, gpus=1, duration_s=3600, limit="2.00", coid="fast", tenant=other)
        await s.tick()
        assert await status(s, fast.id) == "filled"
        # Act: the slow bid commits after that load.
        await tx.commit()
    s.clock.advance(1)
    await s.tick()

    # Assert: it was loaded and filled (before: never loaded, its funds held for ever).
    assert await status(s, slow["id"]) == "filled"
    assert await drift(s) == ([], [])


async def test_a_cancel_committed_after_a_later_numbered_change_was_loaded_leaves_the_book(s: Scenario) -> None:
    # Arrange: a bid rests below the floor; its cancel takes a change number inside a transaction
    # left open while a later change (another tenant's bid) is loaded by a tick.
    await s.market(gpus=8, floor="3.00")
    other = await s.new_tenant("other")
    resting = await s.bid(market=SPOT, gpus=8, duration_s=3600, limit="2.00", coid="low")
    await s.tick()
    assert in_engine(s, resting.id)
    async with s.ctx.pool.acquire() as conn:
        tx = conn.transaction()
        await tx.start()
        await cancel_bid_on(conn, s.tenant_id, resting.id, s.clock())
        later = await s.bid(market=SPOT, gpus=1, duration_s=3600, limit="2.50", coid="later", tenant=other)
        await s.tick()
        await tx.commit()
    s.clock.advance(1)
    await s.tick()

    # Assert: no phantom left in the book (before: it stayed, competing at 2.00 for ever).
    assert await status(s, resting.id) == "cancelled"
    assert not in_engine(s, resting.id) and resting.id not in s.sync.models[MODEL].resting
    assert in_engine(s, later.id)
    assert await drift(s) == ([], [])


async def test_a_new_book_sees_a_bid_committed_after_its_first_load(s: Scenario) -> None:
    # The first load of a new leader reads every open bid; one still uncommitted then must come
    # with the next load.
    await s.market(gpus=8, floor="1.00")
    sync = BookSync()
    async with s.ctx.pool.acquire() as conn, s.ctx.pool.acquire() as writer:
        tx = writer.transaction()
        await tx.start()
        pending, _ = await insert_bid(writer, s.ctx, s.tenant_id, BidCreate(
            market=SPOT, gpus=1, duration_s=3600, limit_price="0.50", client_order_id="pending"), s.clock())
        await sync.load_bid_changes(conn)
        await tx.commit()
        assert pending["id"] not in sync.engine_bids()
        await sync.load_bid_changes(conn)
        assert pending["id"] in sync.engine_bids()
        assert await sync.book_drift(conn) == ([], [])


async def test_a_winner_whose_gpus_cannot_be_assigned_stays_in_the_book_and_fills_later(s: Scenario) -> None:
    # Arrange: between the block load and the persistence the host's GPUs leave its inventory, so
    # the engine's winner cannot be given GPUs.
    await s.market(gpus=8, floor="1.00")
    bid = await s.bid(market=SPOT, gpus=2, duration_s=3600, limit="2.00")
    load_incumbents = s.sync.load_incumbents

    async def gpus_vanish(conn):
        await load_incumbents(conn)
        await conn.execute("UPDATE gpus SET present = false")

    s.sync.load_incumbents = gpus_vanish
    await s.tick()
    assert await status(s, bid.id) == "open"
    # Assert: still in the book (the service reloads unplaced winners: BookSync.reload_bids).
    assert in_engine(s, bid.id)
    assert await drift(s) == ([], [])

    # Once the GPUs are back, it fills.
    s.sync.load_incumbents = load_incumbents
    await s.ctx.pool.execute("UPDATE gpus SET present = true")
    s.clock.advance(1)
    await s.tick()
    assert await status(s, bid.id) == "filled"


async def test_reload_bids_puts_open_winners_back_and_leaves_closed_ones_out(s: Scenario) -> None:
    await s.market(gpus=8, floor="5.00")
    keep = await s.bid(market=SPOT, gpus=1, duration_s=3600, limit="2.00", coid="keep")
    gone = await s.bid(market=SPOT, gpus=1, duration_s=3600, limit="2.00", coid="gone")
    await s.tick()
    book = s.sync.models[MODEL].book
    book.remove_bids(Tier.SPOT, [keep.id, gone.id])  # as the engine does with winners
    async with s.ctx.pool.acquire() as conn:
        await cancel_bid_on(conn, s.tenant_id, gone.id, s.clock())
        assert await s.sync.book_drift(conn) == ([keep.id], [])

        await s.sync.reload_bids(conn, [keep.id, gone.id])

        assert in_engine(s, keep.id) and not in_engine(s, gone.id)
        await s.sync.load_bid_changes(conn)
        assert await s.sync.book_drift(conn) == ([], [])
        assert sorted(book.live_bid_ids().tolist()) == [keep.id]


async def test_a_model_whose_tick_could_not_be_written_is_rebuilt_and_its_winner_fills_later(s: Scenario) -> None:
    # Arrange: every lease insert fails (as a deadlock or any error in the model's transaction).
    await s.market(gpus=8, floor="1.00")
    bid = await s.bid(market=SPOT, gpus=2, duration_s=3600, limit="2.00")
    await s.ctx.pool.execute(
        "CREATE FUNCTION no_leases() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN RAISE EXCEPTION 'injected failure'; END $$;"
        " CREATE TRIGGER no_leases BEFORE INSERT ON leases FOR EACH ROW EXECUTE FUNCTION no_leases()")
    try:
        await s.tick()
    except Exception:
        pass  # the service may let it out; the book must be recoverable either way

    # The engine took the winner out; the model is rebuilt from the database by the next load.
    assert await status(s, bid.id) == "open"
    assert await drift(s) == ([], [])
    await s.ctx.pool.execute("DROP TRIGGER no_leases ON leases")
    s.clock.advance(1)
    await s.tick()
    assert await status(s, bid.id) == "filled"
    assert await drift(s) == ([], [])


async def test_reset_model_rebuilds_the_model_from_the_database(s: Scenario) -> None:
    await s.market(gpus=8, floor="5.00")
    bids = [await s.bid(market=SPOT, gpus=1, duration_s=3600, limit="2.00", coid=f"b{i}") for i in range(3)]
    await s.tick()
    state = s.sync.models[MODEL]
    state.book.remove_bids(Tier.SPOT, [bids[0].id])  # a winner the engine took out, never written
    assert (await drift(s))[0] == [bids[0].id]

    s.sync.reset_model(MODEL)
    assert await drift(s) == ([], [])  # the bids are pending the rebuild, not drift
    async with s.ctx.pool.acquire() as conn:
        await s.sync.load_bid_changes(conn)
    assert sorted(s.sync.engine_bids()) == sorted(b.id for b in bids)
    assert await drift(s) == ([], [])


async def test_a_republished_offer_is_not_free_while_the_withdrawn_offers_leases_run(s: Scenario) -> None:
    # Arrange: a firm lease holds all 8 GPUs of the host under offer A; the owner withdraws A and
    # publishes B for the same GPUs.
    await s.market(gpus=8, floor="1.00", firm_hours=24)
    first = await s.bid(market=FIRM, gpus=8, duration_s=7200, limit="2.00", coid="first")
    await s.tick()
    assert await status(s, first.id) == "filled"
    offer_a = await s.ctx.pool.fetchrow("SELECT id, host_id FROM offers")
    await withdraw_offer(s.ctx, owner(s), offer_a["id"])
    await create_offer(s.ctx, owner(s), OfferCreate(
        host_id=offer_a["host_id"], gpus=8, floor_price="1.00", available_until=START + timedelta(days=2),
        firm_until=START + timedelta(hours=24)))

    # Act: a new bid that would fit on B if B looked free.
    s.clock.advance(1)
    second = await s.bid(market=FIRM, gpus=2, duration_s=3600, limit="3.00", coid="second")
    await s.tick()

    # Assert: not filled, still in the book (before: matched B, found no GPUs, vanished from the book).
    assert await status(s, second.id) == "open"
    assert in_engine(s, second.id)
    assert await s.ctx.pool.fetchval("SELECT count(*) FROM leases") == 1
    blocks = s.sync.models[MODEL].book.blocks()
    assert blocks["free"].tolist() == [0]
    assert await drift(s) == ([], [])


async def test_a_silent_host_sells_nothing_until_it_reports_again(s: Scenario) -> None:
    await s.market(gpus=8, floor="1.00")
    s.clock.advance(10)
    await s.report(1, s.uuids, START, 10)
    s.clock.advance(60)  # silent past the 30 s grace
    async with s.ctx.pool.acquire() as conn:
        await fail_silent_hosts(conn, s.clock(), grace_s=30, fail_s=300)
    assert await s.ctx.pool.fetchval("SELECT health FROM hosts") == "silent"

    bid = await s.bid(market=SPOT, gpus=2, duration_s=3600, limit="2.00")
    await s.tick()
    assert await status(s, bid.id) == "open" and in_engine(s, bid.id)
    assert s.sync.models[MODEL].book.blocks()["free"].tolist() == [0]

    # The agent reports again: the host is back in the market.
    await s.report(2, s.uuids, s.clock() - timedelta(seconds=5), 5)
    s.clock.advance(1)
    await s.tick()
    assert await status(s, bid.id) == "filled"


async def test_a_new_book_over_the_same_database_holds_the_same_bids_blocks_and_incumbents(s: Scenario) -> None:
    # Arrange: filled, resting, cancelled, and spot incumbents, over two ticks.
    await s.market(gpus=8, floor="1.00")
    await s.add_host("h2", gpus=4, floor="2.50")
    await s.bid(market=SPOT, gpus=4, duration_s=3600, limit="2.00", coid="win")
    await s.bid(market=SPOT, gpus=8, duration_s=3600, limit="1.50", coid="rest")
    cancelled = await s.bid(market=SPOT, gpus=2, duration_s=3600, limit="0.50", coid="cancel")
    await s.tick()
    async with s.ctx.pool.acquire() as conn:
        await cancel_bid_on(conn, s.tenant_id, cancelled.id, s.clock())
    await s.bid(market=FIRM, gpus=2, duration_s=600, limit="0.50", coid="firm")
    s.clock.advance(1)
    await s.tick()

    # Act: a new leader's book, loaded as a tick loads.
    fresh = BookSync()
    async with s.ctx.pool.acquire() as conn:
        await fresh.load_bid_changes(conn)
        await fresh.load_blocks(conn, s.clock())
        await fresh.load_incumbents(conn)

    # Assert
    old, new = s.sync.models[MODEL], fresh.models[MODEL]
    assert fresh.engine_bids() == s.sync.engine_bids() and new.resting == old.resting
    old_blocks, new_blocks = old.book.blocks(), new.book.blocks()
    for column in ("block_id", "host_id", "gpus", "free", "floor"):
        assert np.array_equal(old_blocks[column], new_blocks[column]), column
    assert np.array_equal(old.book._inc_ids, new.book._inc_ids) and len(new.book._inc_ids) == 1
    assert await drift(s, fresh) == ([], [])
    # And both clear the next tick the same way.
    assert old.book.tick(int(s.clock().timestamp())).spot.state_hash == \
        new.book.tick(int(s.clock().timestamp())).spot.state_hash


async def test_the_leader_publishes_no_drift_and_a_restarted_leader_rebuilds_the_book(s: Scenario, db_url: str) -> None:
    await s.market(gpus=8, floor="3.00")
    resting = await s.bid(market=SPOT, gpus=1, duration_s=3600, limit="2.00")
    leader = MatchingLeader(s.ctx, db_url)
    assert await leader.tick() is not None
    assert metrics.BOOK_DRIFT_BIDS.labels("missing")._value.get() == 0
    assert resting.id in leader.sync.engine_bids()

    # The engine loses the bid: the gauge says so after the next tick.
    state = leader.sync.models[MODEL]
    state.book.remove_bids(state.resting[resting.id], [resting.id])
    assert await leader.tick() is not None
    assert metrics.BOOK_DRIFT_BIDS.labels("missing")._value.get() == 1

    # A restarted leader rebuilds its book from the database.
    await leader.close()
    assert await leader.tick() is not None
    assert resting.id in leader.sync.engine_bids()
    assert metrics.BOOK_DRIFT_BIDS.labels("missing")._value.get() == 0
    await leader.close()
