"""The shared rate-limit counter on a real PostgreSQL (exchange/core/limits.py): limiters of several
processes (here: several RateLimiter objects, each with its own local slices, on one database) never
serve more than the limit in a window between them; a dead database leaves each counting alone; the
Authorization header is read the same leniently everywhere."""
from __future__ import annotations

import asyncio

import pytest

from exchange.core.auth import parse_authorization
from exchange.core.limits import PostgresWindowCounter, RateLimiter
from exchange.db.pool import create_pool


class FrozenClock:
    """Wall-clock seconds held still, so that a whole test runs inside one window."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_processes_sharing_a_counter_never_serve_more_than_the_limit(db_url: str) -> None:
    pool = await create_pool(db_url, max_size=4)
    try:
        clock = FrozenClock(1_000_000.25)
        # Three "processes", each reserving slices of 3 from one counter, asking concurrently.
        limiters = [RateLimiter(PostgresWindowCounter(pool), slice_size=3, clock=clock) for _ in range(3)]
        decisions = await asyncio.gather(*(limiters[i % 3].take("acct:1", 10) for i in range(60)))
        assert sum(d.allowed for d in decisions) == 10  # slices of 3 add up to 12: only 10 are granted
        assert all(d.reset_s == 1 and (d.allowed or d.remaining == 0) for d in decisions)
        # The next window starts afresh (the row is reused, not added to).
        clock.now += 1
        assert (await limiters[0].take("acct:1", 10)).allowed
        assert await pool.fetchval("SELECT hits FROM rate_limit_counters WHERE key = 'acct:1'") == 3
        # Another key has its own budget.
        assert (await limiters[1].take("acct:2", 10)).allowed
    finally:
        await pool.close()


async def test_a_burst_within_the_limit_is_served_whole(db_url: str) -> None:
    """One process, a burst of 30 concurrent requests against a limit of 200 in slices of 20: every
    one is served. (Each request finding the slice used up used to reserve a slice of its own, so the
    burst reserved 600 of 200 and the tail's reservations came back empty.)"""
    pool = await create_pool(db_url, max_size=8)
    try:
        limiter = RateLimiter(PostgresWindowCounter(pool), slice_size=20, clock=FrozenClock(3_000_000.25))
        decisions = await asyncio.gather(*(limiter.take("acct:7", 200) for _ in range(30)))
        assert all(d.allowed for d in decisions)
        assert await pool.fetchval("SELECT hits FROM rate_limit_counters WHERE key = 'acct:7'") == 40
    finally:
        await pool.close()


async def test_without_its_database_a_process_counts_alone(db_url: str) -> None:
    pool = await create_pool(db_url, max_size=2)
    await pool.close()  # every query now fails
    limiter = RateLimiter(PostgresWindowCounter(pool), slice_size=1, clock=FrozenClock(2_000_000.5))
    decisions = [await limiter.take("addr:10.0.0.1", 3) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]


@pytest.mark.parametrize("header", ["Bearer k", "bearer k", "BEARER   k", "\tbEaReR\tk ", " Bearer k  "])
def test_every_spelling_of_bearer_gives_the_token(header: str) -> None:
    assert parse_authorization(header) == "k"


@pytest.mark.parametrize("header", ["", "Bearer", "Bearer ", "Basic k", "Bearer k extra", "Bearerk", "k"])
def test_anything_else_is_no_token(header: str) -> None:
    assert parse_authorization(header) is None
