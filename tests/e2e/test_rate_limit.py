"""Rate limits count per account (GPUX_RATE_LIMIT_PER_S; test_limits.py: however its key is spelled,
and across server processes): over its limit a key gets 429 with Retry-After in the one error shape,
and its refused requests change nothing; another key is served in that same second; the limited key
is served again once Retry-After has passed.

The test counts requests rather than timing them: the limiter's window is a whole second, so a burst
may straddle two windows on a slow machine; the RateLimit-Remaining header of each served request
says where in its window it fell, which is what the assertions read."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.e2e.client import Api, unique
from tests.support import ADMIN_KEY, start_server

LIMIT_PER_S = 5
MAX_REQUESTS = 200  # a machine that cannot send 5 requests in one second fails here, loudly
ATTEMPTS = 5


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory, server_db):
    proc = start_server(tmp_path_factory.mktemp("limited"), database_url=server_db,
                        extra_env={"GPUX_RATE_LIMIT_PER_S": str(LIMIT_PER_S), "GPUX_SCHEDULER": "0"})
    yield proc
    proc.stop()


async def _new_host(owner: Api, log: list[tuple[str, httpx.Response]]) -> httpx.Response:
    """One request that creates a host when served; it goes in `log` with the host's name."""
    name = unique("host")
    response = await owner.request("POST", "/v1/hosts", json={"name": name, "fabric": "pod-a"})
    log.append((name, response))
    return response


async def _until_refused(owner: Api, log: list[tuple[str, httpx.Response]]) -> httpx.Response:
    """Create hosts one request at a time until the key is refused."""
    for _ in range(MAX_REQUESTS):
        response = await _new_host(owner, log)
        if response.status_code != 201:
            return response
    raise AssertionError(f"{MAX_REQUESTS} requests and never refused: {[r.status_code for _, r in log][-10:]}")


def _assert_rate_limited(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert int(response.headers["retry-after"]) >= 1
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == "rate_limited" and body["error"]["message"]


async def test_a_key_over_its_limit_gets_429_while_another_key_is_served(limited_server) -> None:
    async with Api(limited_server.base_url, ADMIN_KEY) as admin:
        owner = await admin.new_account("owner")
        other = await admin.new_account("owner")
        log: list[tuple[str, httpx.Response]] = []  # every request of the limited key, in order
        for _ in range(ATTEMPTS):
            # Act: the owner's key goes over its limit; the other key asks right after.
            refused = await _until_refused(owner, log)
            other_response = await other.request("POST", "/v1/hosts", json={"name": unique("h"), "fabric": "pod-a"})
            still_refused = await _new_host(owner, log)

            # Assert: the refused request came right after exactly LIMIT_PER_S served ones in its
            # window (RateLimit-Remaining counts down to 0), in the documented error shape.
            _assert_rate_limited(refused)
            index = next(i for i, (_, r) in enumerate(log) if r is refused)
            window = [r for _, r in log[index - LIMIT_PER_S:index]]
            assert [r.status_code for r in window] == [201] * LIMIT_PER_S
            assert [r.headers["ratelimit-remaining"] for r in window] == [str(n) for n in range(LIMIT_PER_S)][::-1]
            # The other key is not limited: exactly its success code, whatever the owner's count.
            assert other_response.status_code == 201, other_response.text
            if still_refused.status_code == 429:
                break  # the owner was refused before and after: the other key was served inside that window
            # The owner's window rolled over between the two requests: that request counted as the
            # first of a new window; go on counting from there.
            assert still_refused.status_code == 201 and still_refused.headers["ratelimit-remaining"] == str(
                LIMIT_PER_S - 1)
        else:
            raise AssertionError(f"the limited key's window rolled over in each of {ATTEMPTS} attempts")
        _assert_rate_limited(still_refused)

        # A key that waited past Retry-After is served again.
        await asyncio.sleep(int(still_refused.headers["retry-after"]) + 0.05)
        again = await _new_host(owner, log)
        assert again.status_code == 201, again.text
        listed = await owner.ok("GET", "/v1/hosts")

    # The refused requests changed nothing: the owner has exactly the hosts it was told were created.
    created = {name for name, r in log if r.status_code == 201}
    assert {h["name"] for h in listed["items"]} == created
    assert sum(r.status_code == 429 for _, r in log) >= 2
