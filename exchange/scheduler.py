"""Periodic jobs (apscheduler 3, asyncio): the auction tick; settlement joins here."""
from __future__ import annotations

import logging

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from exchange.auction.leader import MatchingLeader
from exchange.core.context import AppContext

log = logging.getLogger(__name__)


def start_jobs(ctx: AppContext, dsn: str) -> tuple[AsyncIOScheduler, MatchingLeader]:
    scheduler = AsyncIOScheduler(timezone="UTC")
    leader = MatchingLeader(ctx, dsn)

    async def tick_job() -> None:
        try:
            await leader.tick()
        except Exception:  # a failed tick is retried next interval; never kill the scheduler
            log.exception("auction tick failed")

    scheduler.add_job(tick_job, "interval", seconds=ctx.settings.tick_s, id="auction_tick",
                      max_instances=1, coalesce=True)
    scheduler.start()
    return scheduler, leader
