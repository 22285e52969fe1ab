"""With several server processes, exactly one runs the auction ticks (PostgreSQL advisory lock),
and another takes over when it goes."""
from __future__ import annotations


from exchange.db.pool import create_pool

from exchange.auction.leader import MatchingLeader
from exchange.core.clock import system_clock
from exchange.core.context import AppContext
from exchange.core.settings import Settings


async def test_one_leader_at_a_time_and_failover(db_url: str) -> None:
    pool = await create_pool(db_url, min_size=1, max_size=2)
    ctx = AppContext(settings=Settings.from_env({}), pool=pool, clock=system_clock)
    first, second = MatchingLeader(ctx, db_url), MatchingLeader(ctx, db_url)

    ran_first = await first.tick()
    ran_second = await second.tick()
    await first.close()  # the leader's process goes away
    ran_after = await second.tick()

    assert ran_first is not None and ran_second is None and ran_after is not None
    await second.close()
    await pool.close()
