from __future__ import annotations

import itertools
import os
from pathlib import Path

import asyncpg
import pytest

from exchange.db.databases import clone_database, create_template
from tests.support import with_database

_db_counter = itertools.count()


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A PostgreSQL server for the whole run: DATABASE_URL when set, else the embedded one."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    from exchange.db.embedded import start_embedded, stop_embedded

    home = tmp_path_factory.mktemp("pg")
    server, url = start_embedded(home)
    yield with_database(url, "postgres")
    stop_embedded(server)


@pytest.fixture(scope="session")
async def template_db(pg_server_url: str) -> str:
    """A database with every migration applied, cloned for each test (cheap: a file copy)."""
    return await create_template(pg_server_url, f"gpux_template_{os.getpid()}")


async def create_database(pg_server_url: str, template: str) -> str:
    return await clone_database(pg_server_url, template, f"gpux_t_{os.getpid()}_{next(_db_counter)}")


@pytest.fixture
async def db_url(pg_server_url: str, template_db: str) -> str:
    """A fresh, migrated database of this test's own."""
    return await create_database(pg_server_url, template_db)


@pytest.fixture
async def db(db_url: str):
    conn = await asyncpg.connect(db_url)
    yield conn
    await conn.close()


@pytest.fixture(scope="session", autouse=True)
def _runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    # pgserver (through platformdirs) wants a runtime dir; containers often have none.
    if "XDG_RUNTIME_DIR" not in os.environ:
        path = Path(tmp_path_factory.mktemp("xdg"))
        os.environ["XDG_RUNTIME_DIR"] = str(path)
