"""Limits against real `gpux serve` processes (exchange/core/limits.py, exchange/feed/limits.py):
requests count against the principal however its Authorization header is spelled; unknown keys are
limited per address; two processes on one database share one limit; websockets are limited per
address and per account; a feed subscribe names a bounded number of markets, and naming one twice
subscribes it once.

Like test_rate_limit.py, the request tests count rather than time: with a limit of 5 per second each
process reserves one request at a time from the shared counter (the slice is a tenth of the limit,
at least one), so the RateLimit-Remaining of each served request is exact, and the refused request
comes right after the LIMIT_PER_S served ones of its window whatever the machine's speed."""
from __future__ import annotations

import asyncio
import json
import secrets
import signal

import httpx
import pytest
import websockets

from exchange.feed.client import ws_url
from tests.e2e.client import Api, unique
from tests.support import ADMIN_KEY, start_server

LIMIT_PER_S = 5
AUTH_FAILURES_PER_S = 3
MAX_REQUESTS = 200  # a machine that cannot send 5 requests in one second fails here, loudly
WS_PER_ADDRESS = 4
WS_PER_ACCOUNT = 2
MAX_MARKETS = 8
SHARED_WS_PER_ADDRESS = 3
LIMITED_ENV = {"GPUX_RATE_LIMIT_PER_S": str(LIMIT_PER_S), "GPUX_AUTH_FAILURES_PER_S": str(AUTH_FAILURES_PER_S),
               "GPUX_WS_PER_ADDRESS": str(SHARED_WS_PER_ADDRESS), "GPUX_SCHEDULER": "0"}


@pytest.fixture(scope="module")
def limited_pair(tmp_path_factory, server_db):
    """Two server processes on one database, with small request limits."""
    first = start_server(tmp_path_factory.mktemp("first"), database_url=server_db, extra_env=LIMITED_ENV)
    try:
        second = start_server(tmp_path_factory.mktemp("second"), database_url=server_db, extra_env=LIMITED_ENV)
    except BaseException:
        first.stop()
        raise
    yield first, second
    second.stop()
    first.stop()


@pytest.fixture(scope="module")
def ws_server(tmp_path_factory, server_db):
    """Ordinary request limits, small websocket limits."""
    proc = start_server(tmp_path_factory.mktemp("ws"), database_url=server_db,
                        extra_env={"GPUX_SCHEDULER": "0", "GPUX_WS_PER_ADDRESS": str(WS_PER_ADDRESS),
                                   "GPUX_WS_PER_ACCOUNT": str(WS_PER_ACCOUNT),
                                   "GPUX_WS_MAX_MARKETS_PER_SUBSCRIBE": str(MAX_MARKETS)})
    yield proc
    proc.stop()


def _assert_rate_limited(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) >= 1
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == "rate_limited" and body["error"]["message"]


async def _until_refused(clients: list[httpx.AsyncClient], path: str) -> list[httpx.Response]:
    """GET `path` through each client in turn, one request at a time, until one is refused."""
    log: list[httpx.Response] = []
    for i in range(MAX_REQUESTS):
        response = await clients[i % len(clients)].get(path)
        if response.status_code == 429 and "authentication" in response.json()["error"]["message"]:
            # A process's first lookup of the key counts in the address's failed-auth budget, which an
            # earlier test may have spent this second; it does not count against the account.
            await asyncio.sleep(int(response.headers["retry-after"]))
            continue
        log.append(response)
        if response.status_code != 200:
            return log
    raise AssertionError(f"{MAX_REQUESTS} requests and never refused: {[r.status_code for r in log][-10:]}")


def _assert_one_window(log: list[httpx.Response]) -> None:
    """The last response was refused right after LIMIT_PER_S served ones counted in one budget."""
    _assert_rate_limited(log[-1])
    window = log[-1 - LIMIT_PER_S:-1]
    assert len(window) == LIMIT_PER_S, [r.status_code for r in log]
    assert [r.status_code for r in window] == [200] * LIMIT_PER_S
    assert [r.headers["ratelimit-remaining"] for r in window] == [str(n) for n in range(LIMIT_PER_S)][::-1]


async def test_every_spelling_of_the_bearer_header_counts_against_one_account(limited_pair) -> None:
    server, _ = limited_pair
    async with Api(server.base_url, ADMIN_KEY) as admin:
        owner = await admin.new_account("owner")
    spellings = [f"Bearer {owner.key}", f"bearer {owner.key}", f"BEARER   {owner.key}", f"bEaReR\t{owner.key}"]
    clients = [httpx.AsyncClient(base_url=server.base_url, headers={"Authorization": s}) for s in spellings]
    try:
        # Act: the spellings in turn (each authenticates as the owner: 200), until one is refused.
        log = await _until_refused(clients, "/v1/hosts")
    finally:
        for client in clients:
            await client.aclose()
    # Assert: the five served right before the refusal were four spellings counted as one account.
    _assert_one_window(log)


async def test_unknown_keys_are_limited_per_address_before_costing_lookups(limited_pair) -> None:
    server, _ = limited_pair
    async with Api(server.base_url, ADMIN_KEY) as admin:
        owner = await admin.new_account("owner")
        await owner.ok("GET", "/v1/hosts")  # known to the server from here on
        log: list[httpx.Response] = []
        async with httpx.AsyncClient(base_url=server.base_url) as guesser:
            for _ in range(MAX_REQUESTS):
                # A fresh random key each time: a cache of unknown keys alone would not stop this.
                response = await guesser.get("/v1/hosts",
                                             headers={"Authorization": f"Bearer gpx_{secrets.token_urlsafe(32)}"})
                log.append(response)
                if response.status_code != 401:
                    break
            # Anonymous calls and a known key from the same address are other budgets: still served.
            anonymous = await guesser.get("/v1/markets")
        served = await owner.request("GET", "/v1/hosts")
    assert [r.status_code for r in log[:-1]] == [401] * (len(log) - 1)
    assert log[-1].status_code == 429, [r.status_code for r in log]
    assert log[0].json()["error"]["code"] == "unauthorized"
    _assert_rate_limited(log[-1])
    assert len(log) >= 2  # (a new key's first lookup, like the owner's above, counts in the same budget)
    assert anonymous.status_code == 200 and served.status_code == 200, (anonymous.text, served.text)


async def test_unknown_keys_on_the_stream_count_against_the_same_address_budget(limited_pair) -> None:
    server, _ = limited_pair
    url = ws_url(server.base_url).replace("/v1/feed", "/v1/stream")
    await asyncio.sleep(1)  # the window an earlier test may have spent the budget of has passed
    codes = []
    for _ in range(MAX_REQUESTS):
        async with websockets.connect(url) as ws:
            await ws.send(json.dumps({"op": "auth", "key": f"gpx_{secrets.token_urlsafe(32)}"}))
            answer = await _next(ws)
            close_code = await _closed_code(ws)
        assert answer["type"] == "error", answer
        codes.append((answer["data"]["code"], close_code))
        if answer["data"]["code"] != "unauthorized":
            break
    # Refused as unauthorized until the address's failed-auth budget is spent, then as rate limited
    # (without a lookup).
    assert codes[-1] == ("rate_limited", 1008), codes
    assert set(codes[:-1]) == {("unauthorized", 4401)}, codes


async def test_two_server_processes_on_one_database_share_one_limit(limited_pair) -> None:
    first, second = limited_pair
    async with Api(first.base_url, ADMIN_KEY) as admin:
        owner = await admin.new_account("owner")
    headers = {"Authorization": f"Bearer {owner.key}"}
    async with httpx.AsyncClient(base_url=first.base_url, headers=headers) as one, \
            httpx.AsyncClient(base_url=second.base_url, headers=headers) as two:
        # Act: the two processes in turn, until one refuses.
        log = await _until_refused([one, two], "/v1/hosts")
    # Assert: the five served right before the refusal, by both processes, counted as one budget.
    _assert_one_window(log)


async def _next(ws, timeout: float = 10) -> dict:
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def _closed_code(ws) -> int:
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 10)
    except websockets.ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd else -1


async def test_websockets_are_limited_per_address_and_per_account(ws_server) -> None:
    feed = ws_url(ws_server.base_url)
    stream = feed.replace("/v1/feed", "/v1/stream")
    async with Api(ws_server.base_url, ADMIN_KEY) as admin:
        tenant = await admin.new_account("tenant")
        other = await admin.new_account("tenant")
    opened = []
    try:
        # The account's streams up to its limit (spelled differently: the same account).
        for spelling in ("Bearer", "bearer")[:WS_PER_ACCOUNT]:
            ws = await websockets.connect(stream, additional_headers={"Authorization": f"{spelling} {tenant.key}"})
            opened.append(ws)
            assert (await _next(ws))["type"] == "ready"
        # One stream more for that account is refused; the address has room, so another account is served.
        async with websockets.connect(stream, additional_headers={"Authorization": f"Bearer {tenant.key}"}) as extra:
            refused = await _next(extra)
            assert refused["type"] == "error" and refused["data"]["code"] == "too_many_connections", refused
            assert await _closed_code(extra) == 1008
        ws = await websockets.connect(stream, additional_headers={"Authorization": f"Bearer {other.key}"})
        opened.append(ws)
        assert (await _next(ws))["type"] == "ready"
        # The feed fills the address's last place; the next socket from this address is refused.
        while len(opened) < WS_PER_ADDRESS:
            ws = await websockets.connect(feed)
            opened.append(ws)
            await ws.send(json.dumps({"op": "ping"}))
            assert (await _next(ws))["type"] == "heartbeat"
        async with websockets.connect(feed) as extra:  # refused at once: nothing to send
            refused = await _next(extra)
            assert refused["type"] == "error" and refused["data"]["code"] == "too_many_connections", refused
            assert await _closed_code(extra) == 1008
        # The sockets already open are unaffected.
        await opened[-1].send(json.dumps({"op": "ping"}))
        assert (await _next(opened[-1]))["type"] == "heartbeat"
    finally:
        for ws in opened:
            await ws.close()


async def _feed_socket(server) -> tuple[object, dict]:
    """A /v1/feed socket and its first answer: a heartbeat (admitted) or an error (refused)."""
    ws = await websockets.connect(ws_url(server.base_url))
    try:
        await ws.send(json.dumps({"op": "ping"}))
    except websockets.ConnectionClosed:
        pass  # refused at once; the error envelope is still there to read
    return ws, await _next(ws)


async def _admitted_eventually(server, attempts: int = 50) -> object:
    """A socket admitted once the server has counted a closed one out (refusals in between are fine)."""
    for _ in range(attempts):
        ws, first = await _feed_socket(server)
        if first["type"] == "heartbeat":
            return ws
        await ws.close()
        await asyncio.sleep(0.1)
    raise AssertionError(f"never admitted in {attempts} attempts")


async def test_two_server_processes_share_the_websockets_per_address(limited_pair, tmp_path_factory,
                                                                     server_db) -> None:
    first, second = limited_pair
    opened = []
    try:
        # Act: the address's sockets spread over the two processes, up to the limit.
        for server in (first, second, first)[:SHARED_WS_PER_ADDRESS]:
            ws, answer = await _feed_socket(server)
            opened.append(ws)
            assert answer["type"] == "heartbeat", answer
        # Assert: one more is refused by either process.
        for server in (first, second):
            ws, answer = await _feed_socket(server)
            assert answer["type"] == "error" and answer["data"]["code"] == "too_many_connections", answer
            assert await _closed_code(ws) == 1008
        # A socket closed on one process makes room on the other.
        await opened.pop(0).close()
        opened.append(await _admitted_eventually(second))

        # A process that dies (no clean shutdown) stops counting: its sockets free their places.
        third = start_server(tmp_path_factory.mktemp("third"), database_url=server_db, extra_env=LIMITED_ENV)
        try:
            for ws in opened:
                await ws.close()
            opened = []
            doomed = [await _admitted_eventually(third)]
            while len(doomed) < SHARED_WS_PER_ADDRESS:
                ws, answer = await _feed_socket(third)
                doomed.append(ws)
                assert answer["type"] == "heartbeat", answer
            ws, answer = await _feed_socket(first)
            assert answer["data"]["code"] == "too_many_connections", answer
            await ws.close()
        finally:
            third.stop(signal.SIGKILL)
        opened.append(await _admitted_eventually(first))
    finally:
        for ws in opened:
            await ws.close()


async def _new_market(admin: Api) -> str:
    owner = await admin.new_account("owner")
    model = f"L{unique('gpu').replace('-', '')}-80GB"
    await owner.new_host(gpus=2, model=model, fabric=unique("pod"))
    return f"{model}/spot"


async def _until_heartbeat(ws) -> list[dict]:
    """Ping, then every message up to the heartbeat that answers it (ops are handled in order)."""
    await ws.send(json.dumps({"op": "ping"}))
    messages = []
    while True:
        message = await _next(ws)
        if message["type"] == "heartbeat":
            return messages
        messages.append(message)


async def test_a_subscribe_naming_too_many_markets_is_refused_whole(ws_server) -> None:
    async with Api(ws_server.base_url, ADMIN_KEY) as admin:
        market = await _new_market(admin)
    async with websockets.connect(ws_url(ws_server.base_url)) as ws:
        names = [market] + [f"NOPE{i}/spot" for i in range(MAX_MARKETS)]
        await ws.send(json.dumps({"op": "subscribe", "channels": ["book", "ticker"], "markets": names}))
        messages = await _until_heartbeat(ws)
        # One error, no snapshot (not even of the market that exists), nothing subscribed.
        assert [(m["type"], m["data"]["code"]) for m in messages] == [("error", "too_many_markets")], messages
        await ws.send(json.dumps({"op": "ping"}))
        assert (await _next(ws))["data"] == {"seqs": {}}
        # The same market named MAX_MARKETS + 1 times is as many names: refused too.
        await ws.send(json.dumps({"op": "subscribe", "channels": ["book"], "markets": [market] * (MAX_MARKETS + 1)}))
        assert [m["data"]["code"] for m in await _until_heartbeat(ws)] == ["too_many_markets"]


async def test_a_market_named_many_times_gives_one_snapshot_per_channel(ws_server) -> None:
    async with Api(ws_server.base_url, ADMIN_KEY) as admin:
        market = await _new_market(admin)
    async with websockets.connect(ws_url(ws_server.base_url)) as ws:
        await ws.send(json.dumps({"op": "subscribe", "channels": ["book", "book", "ticker"],
                                  "markets": [market] * MAX_MARKETS}))
        first = await _until_heartbeat(ws)
        assert sorted((m["type"], m["channel"], m["market"]) for m in first) == [
            ("snapshot", "book", market), ("snapshot", "ticker", market)], first
        # Subscribing again to what is already subscribed is a no-op: no second snapshot.
        await ws.send(json.dumps({"op": "subscribe", "channels": ["ticker", "book"], "markets": [market]}))
        assert await _until_heartbeat(ws) == []
        # A channel not yet subscribed gets its snapshot; the others do not get theirs again.
        await ws.send(json.dumps({"op": "subscribe", "channels": ["book", "trades"], "markets": [market, market]}))
        again = await _until_heartbeat(ws)
        assert [(m["type"], m["channel"]) for m in again] == [("snapshot", "trades")], again
        # A fresh snapshot is had by leaving first (as the feed client and the web page do on a gap).
        await ws.send(json.dumps({"op": "unsubscribe", "channels": ["ticker"], "markets": [market]}))
        await ws.send(json.dumps({"op": "subscribe", "channels": ["ticker"], "markets": [market]}))
        assert [(m["type"], m["channel"]) for m in await _until_heartbeat(ws)] == [("snapshot", "ticker")]


async def test_unknown_markets_are_refused_each_with_an_error(ws_server) -> None:
    async with Api(ws_server.base_url, ADMIN_KEY) as admin:
        market = await _new_market(admin)
    async with websockets.connect(ws_url(ws_server.base_url)) as ws:
        await ws.send(json.dumps({"op": "subscribe", "channels": ["book"], "markets": ["NOPE/spot", market, "NOPE/spot"]}))
        messages = await _until_heartbeat(ws)
        assert [(m["type"], m["market"]) for m in messages] == [("error", "NOPE/spot"), ("snapshot", market)], messages
        assert messages[0]["data"]["code"] == "unknown_market"


QUOTES_PER_S = 3


@pytest.fixture(scope="module")
def quote_server(tmp_path_factory, server_db):
    """Ordinary request limits, a small quote limit."""
    proc = start_server(tmp_path_factory.mktemp("quotes"), database_url=server_db,
                        extra_env={"GPUX_SCHEDULER": "0", "GPUX_QUOTE_LIMIT_PER_S": str(QUOTES_PER_S)})
    yield proc
    proc.stop()


async def test_quotes_are_limited_per_account_apart_from_other_requests(quote_server) -> None:
    async with Api(quote_server.base_url, ADMIN_KEY) as admin:
        owner = await admin.new_account("owner")
        model = f"L{unique('gpu').replace('-', '')}-80GB"
        await owner.new_host(gpus=2, model=model, fabric=unique("pod"))
        tenant = await admin.new_account("tenant", deposit="100.00")
        other = await admin.new_account("tenant", deposit="100.00")
    terms = {"market": f"{model}/spot", "gpus": 1, "duration_s": 3600, "limit_price": "1.00"}
    async with httpx.AsyncClient(base_url=quote_server.base_url,
                                 headers={"Authorization": f"Bearer {tenant.key}"}) as client:
        await client.get("/v1/accounts/me")  # the key known to the process: no auth charge below
        log: list[httpx.Response] = []
        for _ in range(MAX_REQUESTS):
            response = await client.post("/v1/bids/quote", json=terms)
            log.append(response)
            if response.status_code != 200:
                break
        # The same account's other requests are another budget; another account's quotes too.
        bids = await client.get("/v1/bids")
        placed = await client.post("/v1/bids", json={**terms, "client_order_id": "after-quotes"})
    async with httpx.AsyncClient(base_url=quote_server.base_url,
                                 headers={"Authorization": f"Bearer {other.key}"}) as client:
        others = await client.post("/v1/bids/quote", json=terms)

    _assert_rate_limited(log[-1])
    assert "quote" in log[-1].json()["error"]["message"]
    # Counted exactly (the slice of a limit of 3 is 1): 3 served in the refused one's window.
    window = log[-1 - QUOTES_PER_S:-1]
    assert [r.status_code for r in window] == [200] * QUOTES_PER_S, [r.status_code for r in log]
    assert bids.status_code == 200 and placed.status_code == 201, (bids.text, placed.text)
    assert others.status_code == 200, others.text
