from __future__ import annotations

import pytest

from tests.conftest import create_database
from tests.e2e.client import Api
from tests.support import ADMIN_KEY, start_server


@pytest.fixture(scope="module")
async def server_db(pg_server_url: str, template_db: str) -> str:
    return await create_database(pg_server_url, template_db)


@pytest.fixture
async def fresh_db(pg_server_url: str, template_db: str) -> str:
    """A new database of its own for one test (one that restarts servers or counts everything)."""
    return await create_database(pg_server_url, template_db)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, server_db: str):
    """A real `gpux serve` process on its own database, shared by one test module."""
    proc = start_server(tmp_path_factory.mktemp("server"), database_url=server_db)
    yield proc
    proc.stop()


@pytest.fixture
async def admin(server) -> Api:
    async with Api(server.base_url, ADMIN_KEY) as api:
        yield api
