"""Quote latency against the number of open bids in the quoted model: `python -m loadtests.bench_quote`
(DATABASE_URL: a PostgreSQL server; throwaway databases are cloned on it from a migrated template).

In-process (the service function, no HTTP): each size gets a fresh database with 50 hosts x 8 GPUs
offered at 1.00 and N open spot bids of 1-8 GPUs at limits 0.90-1.39, inserted in one statement;
then 7 quotes of 4 GPUs at 2.00. A quote rebuilds the model's whole book, so its cost grows with N
(fetching the rows and building the engine's book; the clearing itself is a few ms)."""
from __future__ import annotations

import asyncio
import os
import statistics
import time

from exchange.bids.quote import quote_bid
from exchange.bids.schemas import QuoteRequest
from exchange.db.databases import clone_database, create_template, drop_database
from matching import warm_up
from tests.integration.scenario import Scenario

SIZES = (1_000, 10_000, 100_000)
RUNS = 7


async def main() -> None:
    server = os.environ["DATABASE_URL"]
    template_name = f"gpux_template_bq_{os.getpid()}"
    template = await create_template(server, template_name)
    warm_up()
    for n_bids in SIZES:
        name = f"gpux_bq_{os.getpid()}_{n_bids}"
        s = await Scenario.create(await clone_database(server, template, name), fee_bps=0)
        await s.market(model="B-80GB", gpus=8, floor="1.00")
        for h in range(49):
            await s.add_host(f"bench-{h}", model="B-80GB", gpus=8, floor="1.00")
        await s.ctx.pool.execute(
            "INSERT INTO bids (account_id, market, gpus, duration_s, limit_price, min_survival, min_notice_s,"
            " time_in_force, client_order_id, request_hash, requeue_on_preempt, status, hold_amount, created_at,"
            " updated_at) SELECT $1, 'B-80GB/spot', 1 + i % 8, 3600, 900000 + (i % 50) * 10000, 0, 0, 'gtc', 'b' || i,"
            " '\\x00', false, 'open', 0, now(), now() FROM generate_series(1, $2) i", s.tenant_id, n_bids)
        took_s = []
        for _ in range(RUNS):
            started = time.perf_counter()
            await quote_bid(s.ctx, s.tenant_id, QuoteRequest(market="B-80GB/spot", gpus=4, duration_s=3600,
                                                             limit_price="2.00"))
            took_s.append(time.perf_counter() - started)
        print(f"open bids {n_bids:>7}: quote p50 {statistics.median(took_s) * 1000:7.1f} ms,"
              f" max {max(took_s) * 1000:7.1f} ms ({RUNS} runs)", flush=True)
        await s.close()
        await drop_database(server, name)
    await drop_database(server, template_name)


if __name__ == "__main__":
    asyncio.run(main())
