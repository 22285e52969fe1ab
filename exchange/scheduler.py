"""Periodic jobs (apscheduler 3, asyncio): bid expiry now; the auction tick and settlement join here."""
from __future__ import annotations

import logging

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from exchange.bids.service import expire_bids
from exchange.core.context import AppContext

log = logging.getLogger(__name__)


def start_jobs(ctx: AppContext) -> AsyncIOScheduler:
    scheduler = AsyncIOScheduler(timezone="UTC")

    async def expire_job() -> None:
        try:
            await expire_bids(ctx.pool, ctx.clock())
        except Exception:  # a failed run is retried next interval; never kill the scheduler
            log.exception("bid expiry failed")

    scheduler.add_job(expire_job, "interval", seconds=ctx.settings.tick_s, id="expire_bids",
                      max_instances=1, coalesce=True)
    scheduler.start()
    return scheduler
