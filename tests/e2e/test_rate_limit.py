"""Over its rate limit a key gets 429 with Retry-After, and the refused requests change nothing."""
from __future__ import annotations

import asyncio

import pytest

from tests.e2e.client import Api, unique
from tests.support import ADMIN_KEY, start_server


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory, server_db):
    proc = start_server(tmp_path_factory.mktemp("limited"), database_url=server_db,
                        extra_env={"GPUX_RATE_LIMIT_PER_S": "5", "GPUX_SCHEDULER": "0"})
    yield proc
    proc.stop()


async def test_a_key_over_its_limit_gets_429_with_retry_after(limited_server) -> None:
    async with Api(limited_server.base_url, ADMIN_KEY) as admin:
        tenant = await admin.new_account("tenant")
        await asyncio.sleep(1.1)  # the admin's own calls above do not count against the tenant

        responses = await asyncio.gather(*(tenant.request("GET", "/v1/accounts/me/balance") for _ in range(12)))
        other = await admin.request("POST", "/v1/accounts", json={"name": unique("t"), "role": "tenant"})

    limited = [r for r in responses if r.status_code == 429]
    assert 1 <= len(limited) <= 7 and sum(r.status_code == 200 for r in responses) >= 5
    assert all(r.headers.get("retry-after") and r.json()["error"]["code"] == "rate_limited" for r in limited)
    assert other.status_code in (201, 429)
