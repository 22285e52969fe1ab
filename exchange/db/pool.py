"""The asyncpg pool: every connection is prepared once with what the services expect of it."""
from __future__ import annotations

import asyncpg

# Metering stages each report here before one INSERT ... ON CONFLICT DO NOTHING: COPY is the fast
# way in, but cannot skip rows already stored. Created once per connection, emptied at each commit.
STAGING_DDL = ("CREATE TEMP TABLE IF NOT EXISTS meter_stage (LIKE meter_samples INCLUDING DEFAULTS)"
               " ON COMMIT DELETE ROWS")


async def init_connection(conn: asyncpg.Connection) -> None:
    if await conn.fetchval("SELECT to_regclass('meter_samples') IS NOT NULL"):
        await conn.execute(STAGING_DDL)


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 16) -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, command_timeout=60,
                                     init=init_connection)
