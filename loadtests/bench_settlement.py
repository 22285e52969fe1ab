"""`gpux bench settlement`: metering ingestion and settlement on a seeded load, against the raw COPY
rate of the same PostgreSQL in the same run.

The load: `leases` one-GPU firm leases on hosts of 8 GPUs, and `samples` meter samples spread
evenly over their GPUs (1 Hz), sent as one report per host through the real ingestion code
(validation, dedupe, COPY into a staging table, insert), then one real settlement run over every
lease. The baseline is a plain COPY of the same sample rows into an unindexed table: the floor any
ingestion path pays.
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from datetime import datetime, timedelta, timezone

import asyncpg

from exchange.core.auth import Principal
from exchange.core.clock import ManualClock
from exchange.core.context import AppContext
from exchange.core.settings import Settings
from exchange.db.migrate import apply_migrations
from exchange.db.pool import create_pool
from exchange.metering.schemas import MeterReport, MeterSample
from exchange.metering.service import ingest_report
from exchange.settlement.service import settle
from exchange.core.net import with_database

GPUS_PER_HOST = 8
START = datetime(2026, 6, 1, tzinfo=timezone.utc)


async def _seed(conn: asyncpg.Connection, leases: int, price: int) -> list[tuple[int, list[str]]]:
    """Accounts, hosts, GPUs, an offer per host, filled bids and active leases, with the tenant's
    hold in place, all by bulk SQL (the bench measures metering and settlement, not set-up)."""
    hosts = -(-leases // GPUS_PER_HOST)
    await conn.execute(
        "INSERT INTO accounts (id, name, role, api_key_hash, created_at) VALUES"
        " (1, 'owner', 'owner', 'o', $1), (2, 'tenant', 'tenant', 't', $1)", START)
    await conn.execute("INSERT INTO ledger_accounts (account_id, kind) VALUES (1,'available'),(1,'held'),"
                       "(2,'available'),(2,'held')")
    await conn.execute("INSERT INTO markets (id, model, tier, created_at) VALUES ('H100-80GB/firm','H100-80GB','firm',$1)",
                       START)
    await conn.execute(
        "INSERT INTO hosts (id, owner_id, name, fabric, agent_token_hash, created_at)"
        " SELECT h, 1, 'h' || h, 'pod', int8send(h), $1 FROM generate_series(1, $2) h", START, hosts)
    await conn.execute(
        "INSERT INTO gpus (uuid, host_id, idx, model, memory_mb, reported_at)"
        " SELECT format('GPU-%s-%s', h, i), h, i, 'H100-80GB', 81559, $1"
        " FROM generate_series(1, $2) h, generate_series(0, $3 - 1) i", START, hosts, GPUS_PER_HOST)
    await conn.execute(
        "INSERT INTO offers (id, host_id, model, gpus, floor_price, available_from, available_until, firm_until,"
        " reclaim_notice_s, reclaim_rate_per_h, created_at)"
        " SELECT h, h, 'H100-80GB', $3, $4, $1, $1::timestamptz + interval '2 days', $1::timestamptz + interval '1 day', 120, 0, $1"
        " FROM generate_series(1, $2) h", START, hosts, GPUS_PER_HOST, price)
    hold_each = price  # one GPU for one hour at the price
    await conn.execute(
        "INSERT INTO bids (id, account_id, market, gpus, duration_s, limit_price, time_in_force, client_order_id,"
        " request_hash, status, hold_amount, created_at, updated_at)"
        " SELECT n, 2, 'H100-80GB/firm', 1, 3600, $3, 'gtc', 'c' || n, 'x', 'filled', 0, $1, $1"
        " FROM generate_series(1, $2) n", START, leases, price)
    await conn.execute(
        "INSERT INTO leases (id, bid_id, account_id, host_id, offer_id, market, tier, gpus, gpu_uuids, price,"
        " limit_price, floor_price, start_at, planned_end_at, status, hold_amount, created_at)"
        " SELECT n, n, 2, (n - 1) / $3 + 1, (n - 1) / $3 + 1, 'H100-80GB/firm', 'firm', 1,"
        " ARRAY[format('GPU-%s-%s', (n - 1) / $3 + 1, (n - 1) % $3)], $4, $4, $4, $1, $1::timestamptz + interval '1 hour',"
        " 'active', $5, $1 FROM generate_series(1, $2) n", START, leases, GPUS_PER_HOST, price, hold_each)
    total = hold_each * leases
    async with conn.transaction():
        transfer = await conn.fetchval("INSERT INTO transfers (kind, account_id, created_at) VALUES ('seed', 2, $1)"
                                       " RETURNING id", START)
        world = await conn.fetchval("SELECT id FROM ledger_accounts WHERE kind = 'world'")
        held = await conn.fetchval("SELECT id FROM ledger_accounts WHERE account_id = 2 AND kind = 'held'")
        await conn.executemany("INSERT INTO postings (transfer_id, ledger_account_id, amount) VALUES ($1, $2, $3)",
                               [(transfer, world, -total), (transfer, held, total)])
    rows = await conn.fetch("SELECT host_id, array_agg(gpu_uuids[1] ORDER BY id) AS uuids FROM leases"
                            " GROUP BY host_id ORDER BY host_id")
    return [(r["host_id"], list(r["uuids"])) for r in rows]


def _reports(hosts: list[tuple[int, list[str]]], samples: int, seed: int) -> list[tuple[int, MeterReport]]:
    rng = random.Random(seed)
    gpus = sum(len(u) for _, u in hosts)
    seconds = max(1, samples // gpus)
    reports = []
    for host_id, uuids in hosts:
        batch = [MeterSample(uuid=u, ts=START + timedelta(seconds=s), util=rng.randint(80, 100),
                             mem_used_mb=rng.randint(40_000, 80_000), power_mw=rng.randint(550_000, 700_000),
                             energy_mj=1_000_000 + s * 650_000, temp_c=rng.randint(55, 80), healthy=True)
                 for s in range(seconds) for u in uuids]
        reports.append((host_id, MeterReport(seq=1, samples=batch)))
    return reports


async def _run(url: str, leases: int, samples: int, seed: int) -> dict:
    admin = await asyncpg.connect(url)
    name = f"gpux_bench_{os.getpid()}"
    await admin.execute(f"DROP DATABASE IF EXISTS {name}")
    await admin.execute(f"CREATE DATABASE {name}")
    bench_url = with_database(url, name)
    conn = await asyncpg.connect(bench_url)
    await apply_migrations(conn)
    await conn.close()
    pool = await create_pool(bench_url, min_size=2, max_size=4)
    try:
        async with pool.acquire() as conn:
            hosts = await _seed(conn, leases, price=2_000_000)
        reports = _reports(hosts, samples, seed)
        rows = [(s.uuid, s.ts, host_id, 1, s.util, s.mem_used_mb, s.power_mw, s.energy_mj, s.temp_c, s.healthy)
                for host_id, report in reports for s in report.samples]

        # Baseline: raw COPY of the same rows into an unindexed table.
        async with pool.acquire() as conn:
            await conn.execute("CREATE TABLE copy_baseline (LIKE meter_samples)")
            started = time.perf_counter()
            await conn.copy_records_to_table("copy_baseline", records=rows,
                                             columns=[c for c in ("uuid", "ts", "host_id", "seq", "util", "mem_used_mb",
                                                                  "power_mw", "energy_mj", "temp_c", "healthy")])
            copy_s = time.perf_counter() - started

        clock = ManualClock(START + timedelta(minutes=10))
        ctx = AppContext(settings=Settings.from_env({}), pool=pool, clock=clock)
        started = time.perf_counter()
        accepted = 0
        for host_id, report in reports:
            ack = await ingest_report(ctx, Principal(role="agent", account_id=1, host_id=host_id), report)
            accepted += ack.accepted
        ingest_s = time.perf_counter() - started

        async with pool.acquire() as conn:
            summary = await settle(conn, clock(), fee_bps=100, max_gap_s=5.0, close_after_s=30)
            again = await settle(conn, clock(), fee_bps=100, max_gap_s=5.0, close_after_s=30)
        if summary.leases != leases or summary.billed != leases or again.billed != 0:
            raise RuntimeError(f"settlement did not bill every lease exactly once: {summary} then {again}")
    finally:
        await pool.close()
        await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await admin.close()
    return {
        "leases": leases,
        "samples": accepted,
        "leases_per_s": round(leases / summary.seconds, 1),
        "samples_per_s": round(accepted / ingest_s, 1),
        "copy_rows_per_s": round(len(rows) / copy_s, 1),
        "ingest_vs_copy": round((accepted / ingest_s) / (len(rows) / copy_s), 3),
        "settle_s": round(summary.seconds, 3),
        "ingest_s": round(ingest_s, 3),
        "copy_s": round(copy_s, 3),
    }


def run(leases: int = 10_000, samples: int = 100_000, seed: int = 1, database_url: str | None = None) -> dict:
    """Runs on DATABASE_URL's server, or on the embedded one under GPUX_HOME, in a throwaway database."""
    url = database_url or os.environ.get("DATABASE_URL")
    server = None
    if not url:
        from exchange.db.embedded import start_embedded

        server, url = start_embedded(Settings.from_env().home)
    try:
        return asyncio.run(_run(url, leases, samples, seed))
    finally:
        if server is not None:
            from exchange.db.embedded import stop_embedded

            stop_embedded(server)


def format_table(f: dict) -> str:
    lines = [
        f"gpux bench settlement — {f['leases']:,} active leases, {f['samples']:,} samples (same PostgreSQL, one run)",
        f"{'measure':<38}{'value':>16}",
        f"{'settlement: leases settled / s':<38}{f['leases_per_s']:>16,.0f}",
        f"{'metering: samples ingested / s':<38}{f['samples_per_s']:>16,.0f}",
        f"{'baseline: raw COPY rows / s':<38}{f['copy_rows_per_s']:>16,.0f}",
        f"{'ingestion as a share of raw COPY':<38}{f['ingest_vs_copy']:>16.1%}",
    ]
    return "\n".join(lines)
