"""Periodic jobs (apscheduler 3, asyncio): the auction tick (matching leader only) and settlement
(any process; an advisory lock lets one run at a time)."""
from __future__ import annotations

import asyncio
import logging

from apscheduler.schedulers.asyncio import AsyncIOScheduler

from exchange.auction.leader import MatchingLeader
from exchange.core.context import AppContext
from exchange.settlement.service import settle

log = logging.getLogger(__name__)


def start_jobs(ctx: AppContext, dsn: str) -> tuple[AsyncIOScheduler, MatchingLeader]:
    scheduler = AsyncIOScheduler(timezone="UTC")
    leader = MatchingLeader(ctx, dsn)

    async def tick_job() -> None:
        try:
            await leader.tick()
        except asyncio.CancelledError:
            # Shutdown cancels a tick in flight: its transaction rolls back, nothing to report.
            log.info("auction tick cancelled by shutdown")
        except Exception:  # a failed tick is retried next interval; never kill the scheduler
            log.exception("auction tick failed")

    async def settle_job() -> None:
        try:
            async with ctx.pool.acquire() as conn:
                await settle(conn, ctx.clock(), fee_bps=ctx.settings.fee_bps, max_gap_s=ctx.settings.meter_max_gap_s,
                             close_after_s=ctx.settings.settle_close_after_s)
        except asyncio.CancelledError:
            log.info("settlement cancelled by shutdown")
        except Exception:
            log.exception("settlement failed")

    scheduler.add_job(tick_job, "interval", seconds=ctx.settings.tick_s, id="auction_tick",
                      max_instances=1, coalesce=True)
    scheduler.add_job(settle_job, "interval", seconds=ctx.settings.settle_s, id="settlement",
                      max_instances=1, coalesce=True)
    scheduler.start()
    return scheduler, leader
