"""Good-till-date bids expire on the scheduler's run and release their hold."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone


from exchange.db.pool import create_pool

from exchange.bids.schemas import BidCreate
from exchange.bids.service import expire_bids, place_bid
from exchange.core.clock import ManualClock
from exchange.core.context import AppContext
from exchange.core.settings import Settings
from exchange.ledger import service as ledger
from exchange.markets.service import ensure_markets

START = datetime(2026, 3, 1, 12, 0, tzinfo=timezone.utc)


async def test_gtd_bid_expires_and_releases_its_hold(db_url: str) -> None:
    # Arrange: a funded tenant with one bid that expires in 10 minutes, on a manual clock.
    clock = ManualClock(START)
    pool = await create_pool(db_url, min_size=1, max_size=2)
    ctx = AppContext(settings=Settings.from_env({}), pool=pool, clock=clock)
    async with pool.acquire() as conn, conn.transaction():
        await ensure_markets(conn, {"H100-80GB"}, START)
        tenant = await conn.fetchval("INSERT INTO accounts (name, role, api_key_hash, created_at)"
                                     " VALUES ('t', 'tenant', 'x', $1) RETURNING id", START)
        books = await ledger.open_books(conn, tenant)
        world = await ledger.system_book(conn, "world")
        await ledger.post_transfer(conn, kind="deposit", account_id=tenant, now=START,
                                   postings=[(world, -10_000_000), (books.available, 10_000_000)])
    bid, _ = await place_bid(ctx, tenant, BidCreate(
        market="H100-80GB/spot", gpus=1, duration_s=3600, limit_price="2.00", client_order_id="g1",
        expire_at=START + timedelta(minutes=10)))

    # Act: nothing expires before its time; after it, the bid ends and the hold returns.
    clock.advance(5 * 60)
    async with pool.acquire() as conn, conn.transaction():
        early = await expire_bids(conn, clock())
    clock.advance(6 * 60)
    async with pool.acquire() as conn, conn.transaction():
        late = await expire_bids(conn, clock())

    # Assert
    assert bid.time_in_force == "gtd" and (early, late) == (0, 1)
    assert await pool.fetchval("SELECT status FROM bids WHERE id = $1", bid.id) == "expired"
    assert await ledger.balances(pool, tenant) == {"available": 10_000_000, "held": 0}
    await pool.close()
