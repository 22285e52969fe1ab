"""The matching leader's book equals the database, under any commit order: changes committed late
are loaded, winners that could not be persisted come back, leases on a republished offer's host
and hosts that stopped reporting are not sold again, and a new leader rebuilds the same book."""
from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest

from exchange.auction.book_sync import BookSync
from exchange.auction.service import run_tick
from exchange.bids.service import close_bid
from exchange.core.money import cost_micros
from exchange.ledger import service as ledger
from tests.integration.scenario import START, Scenario

MODEL = "H100-80GB"


@pytest.fixture
async def s(db_url: str):
    scenario = await Scenario.create(db_url, fee_bps=0)
    yield scenario
    await scenario.close()


async def begin_bid(conn: asyncpg.Connection, s: Scenario, *, market: str, gpus: int, duration_s: int,
                    limit_micros: int, coid: str) -> int:
    """Insert an open bid and its hold inside the caller's open transaction (as bids.service does),
    so that the test decides when it commits."""
    hold = cost_micros(limit_micros, gpus, duration_s)
    now = s.clock()
    bid_id = await conn.fetchval(
        "INSERT INTO bids (account_id, market, gpus, duration_s, limit_price, time_in_force, client_order_id,"
        " request_hash, status, hold_amount, created_at, updated_at)"
        " VALUES ($1, $2, $3, $4, $5, 'gtc', $6, '\\x00', 'open', $7, $8, $8) RETURNING id",
        s.tenant_id, market, gpus, duration_s, limit_micros, coid, hold, now)
    await ledger.place_hold(conn, account_id=s.tenant_id, amount=hold, now=now, ref_type="bid", ref_id=bid_id)
    return bid_id


async def bid_status(s: Scenario, bid_id: int) -> str:
    return await s.ctx.pool.fetchval("SELECT status FROM bids WHERE id = $1", bid_id)


async def drift(s: Scenario) -> tuple[list[int], list[int]]:
    async with s.ctx.pool.acquire() as conn:
        return await s.sync.book_drift(conn)


async def test_book_drift_is_empty_after_ticks_and_names_a_bid_missing_from_the_book(s: Scenario) -> None:
    await s.market(gpus=8, floor="1.00")
    first = await s.bid(market=f"{MODEL}/spot", gpus=8, duration_s=3600, limit="2.00", coid="a")
    await s.bid(market=f"{MODEL}/spot", gpus=8, duration_s=3600, limit="1.50", coid="b")
    await s.tick()
    assert await bid_status(s, first.id) == "filled"
    assert await drift(s) == ([], [])

    # A bid placed after the last load is pending, not drift.
    await s.bid(market=f"{MODEL}/spot", gpus=1, duration_s=3600, limit="1.50", coid="c")
    assert await drift(s) == ([], [])

    # The engine loses a resting bid behind the sync's back: the database has it open.
    state = s.sync.models[MODEL]
    lost = next(iter(state.resting))
    state.book.remove_bids(state.resting[lost], [lost])
    assert await drift(s) == ([lost], [])
