"""Whole databases on one server: a migrated template, and cheap clones of it (a file copy). The
test suite and the simulation give each test or seed its own clone."""
from __future__ import annotations

import asyncpg

from exchange.core.net import with_database
from exchange.db.migrate import apply_migrations


async def _admin(server_url: str, *statements: str) -> None:
    admin = await asyncpg.connect(server_url)
    try:
        for statement in statements:
            await admin.execute(statement)
    finally:
        await admin.close()


async def create_template(server_url: str, name: str) -> str:
    """A new database `name` with every migration applied (an old one of that name is dropped)."""
    await _admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name}")
    conn = await asyncpg.connect(with_database(server_url, name))
    try:
        await apply_migrations(conn)
    finally:
        await conn.close()
    return name


async def clone_database(server_url: str, template: str, name: str) -> str:
    """A fresh copy of `template` named `name`; returns its URL."""
    await _admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)", f"CREATE DATABASE {name} TEMPLATE {template}")
    return with_database(server_url, name)


async def drop_database(server_url: str, name: str) -> None:
    await _admin(server_url, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
