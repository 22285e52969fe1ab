"""The feed and the stream survive losing their LISTEN connections (issue 11, must-show 3): once
PostgreSQL restarts under a live `gpux serve`, or its listener backends are terminated, /healthz says
"degraded" until they are back, feed subscribers get a fresh snapshot per channel and then updates
whose seqs go on from it one by one, the stream delivers every event (no seq missing, also those that
happened while it was deaf), a new subscriber gets today's state, and /metrics counts the reconnects.

Before the fix both tests fail: the subscribers get nothing more and /healthz stays "ok"."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Awaitable, Callable

import asyncpg
import httpx
import websockets

from exchange.feed.client import ws_url
from tests.conftest import create_database
from tests.e2e.client import Api, in_hours, unique
from tests.support import ADMIN_KEY, start_server

CHANNELS = ("ticker", "book", "trades", "candles")
# The first reconnect waits 1-2 s (jitter), so the test sees "degraded" while the listeners are down.
LISTEN_ENV = {"GPUX_LISTEN_RETRY_MIN_S": "2", "GPUX_LISTEN_RETRY_MAX_S": "2", "GPUX_LISTEN_CHECK_S": "1"}
WITHIN_S = 30  # "again within seconds": a generous bound on a loaded CI machine, not a timing claim


async def health(base_url: str) -> dict:
    async with httpx.AsyncClient(timeout=5) as http:
        try:
            response = await http.get(base_url + "/healthz")
        except httpx.HTTPError:
            return {"status": "unreachable"}
    body = response.json()
    return body if isinstance(body, dict) and "status" in body else {"status": f"http {response.status_code}"}


async def wait_health(base_url: str, predicate: Callable[[dict], bool], what: str) -> list[dict]:
    """Poll /healthz until `predicate` holds; every distinct answer seen on the way."""
    seen: list[dict] = []
    try:
        async with asyncio.timeout(WITHIN_S):
            while True:
                body = await health(base_url)
                if not seen or seen[-1] != body:
                    seen.append(body)
                if predicate(body):
                    return seen
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"/healthz never {what}; saw {seen}") from None


class Feed:
    """A raw /v1/feed subscriber that keeps every envelope it received, in order."""

    def __init__(self, ws) -> None:
        self.ws = ws
        self.messages: list[dict] = []

    async def read_until(self, predicate: Callable[[list[dict]], bool], what: str) -> None:
        try:
            async with asyncio.timeout(WITHIN_S):
                while not predicate(self.messages):
                    message = json.loads(await self.ws.recv())
                    if message["type"] != "heartbeat":
                        self.messages.append(message)
        except TimeoutError:
            tail = [(m["channel"], m["type"], m["seq"]) for m in self.messages[-12:]]
            raise AssertionError(f"feed: no {what} within {WITHIN_S} s; last messages {tail}") from None


class Stream:
    def __init__(self, ws) -> None:
        self.ws = ws
        self.events: list[dict] = []

    async def read_until_seq(self, seq: int) -> None:
        try:
            async with asyncio.timeout(WITHIN_S):
                while not self.events or self.events[-1]["seq"] < seq:
                    event = json.loads(await self.ws.recv())
                    if event["type"] not in ("heartbeat", "ready"):
                        self.events.append(event)
        except TimeoutError:
            got = [(e["type"], e["seq"]) for e in self.events]
            raise AssertionError(f"stream: no event {seq} within {WITHIN_S} s; got {got}") from None


def snapshots_then_consecutive(messages: list[dict], market: str) -> dict[str, int]:
    """Each channel's last snapshot among `messages` and its seq; asserts the updates after it go on
    from that seq one by one."""
    seqs = {}
    for channel in CHANNELS:
        mine = [m for m in messages if m["market"] == market and m["channel"] == channel]
        snapshots = [i for i, m in enumerate(mine) if m["type"] == "snapshot"]
        assert snapshots, f"no fresh {channel} snapshot after the listener came back: {mine}"
        snapshot = mine[snapshots[-1]]
        after = [m["seq"] for m in mine[snapshots[-1] + 1:] if m["type"] == "update"]
        assert after == list(range(snapshot["seq"] + 1, snapshot["seq"] + 1 + len(after))), (channel, snapshot["seq"], after)
        seqs[channel] = snapshot["seq"]
    return seqs


def metric(text: str, name: str, listener: str) -> float:
    found = re.search(rf'^{name}\{{listener="{listener}"\}} (\S+)$', text, re.M)
    return float(found.group(1)) if found else 0.0


async def read_metrics(base_url: str) -> str:
    async with httpx.AsyncClient(timeout=10) as http:
        response = await http.get(base_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert response.status_code == 200, response.text
    return response.text


async def run_scenario(base_url: str, db_url: str, disrupt: Callable[[Api, Callable[[], Awaitable[None]]], Awaitable[None]]) -> None:
    """Feed and stream subscribers, a fill; then `disrupt` (which calls back `during` while the
    listeners are down); then the checks."""
    async with Api(base_url, ADMIN_KEY) as admin:
        owner = await admin.new_account("owner")
        model = f"L{unique('gpu').replace('-', '')}-80GB"
        host, _ = await owner.new_host(gpus=8, model=model, fabric=unique("pod"))
        await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": 8, "floor_price": "1.00",
                                                        "available_until": in_hours(24)})
        tenant = await admin.new_account("tenant", deposit="1000.00")
        market = f"{model}/spot"

        async def fill(n: int) -> None:
            await tenant.ok("POST", "/v1/bids", 201, json={"market": market, "gpus": 2, "duration_s": 3600,
                                                            "limit_price": "2.00", "client_order_id": f"fill-{n}"})

        feed_url = ws_url(base_url)
        stream_url = feed_url.replace("/v1/feed", "/v1/stream")
        async with websockets.connect(feed_url, max_size=2 ** 24) as feed_ws, \
                websockets.connect(stream_url, additional_headers={"Authorization": f"Bearer {tenant.key}"}) as stream_ws:
            feed, stream = Feed(feed_ws), Stream(stream_ws)
            await feed_ws.send(json.dumps({"op": "subscribe", "channels": list(CHANNELS), "markets": [market]}))
            await feed.read_until(lambda ms: sum(m["type"] == "snapshot" for m in ms) == 4, "first snapshots")
            assert json.loads(await stream_ws.recv())["type"] == "ready"

            # Arrange: one fill seen live on both (fill, lease_started: stream seqs 1 and 2).
            await fill(1)
            await stream.read_until_seq(2)
            await feed.read_until(lambda ms: any(m["channel"] == "trades" and m["type"] == "update" for m in ms),
                                  "trade update")
            before = len(feed.messages)

            # Act: lose the listeners; a second fill happens while they are down (when the database is up).
            await disrupt(admin, lambda: fill(2))

            # Assert: fresh snapshots arrive on the feed without anyone asking, the stream delivers what
            # it missed (seqs 3 and 4), then a third fill reaches both live, in sequence.
            await feed.read_until(lambda ms: {m["channel"] for m in ms[before:] if m["type"] == "snapshot"} == set(CHANNELS),
                                  "fresh snapshot of every channel after the listener came back")
            await stream.read_until_seq(4)
            await fill(3)
            await stream.read_until_seq(6)
            trade_ids = {t["id"] for t in await trades_of(admin, market)}
            assert len(trade_ids) == 3
            await feed.read_until(lambda ms: trade_ids <= {t["id"] for m in ms if m["channel"] == "trades"
                                                           for t in m["data"]["trades"]}, "the third trade")
            fresh = snapshots_then_consecutive(feed.messages[before:], market)
            assert [e["seq"] for e in stream.events] == [1, 2, 3, 4, 5, 6]
            assert [e["type"] for e in stream.events] == ["fill", "lease_started"] * 3

        # A new subscriber gets today's state: the trades snapshot holds all three trades, at the stored seq.
        async with websockets.connect(feed_url, max_size=2 ** 24) as late_ws:
            late = Feed(late_ws)
            await late_ws.send(json.dumps({"op": "subscribe", "channels": ["trades"], "markets": [market]}))
            await late.read_until(lambda ms: any(m["type"] == "snapshot" for m in ms), "snapshot for a new subscriber")
        snapshot = next(m for m in late.messages if m["type"] == "snapshot")
        conn = await asyncpg.connect(db_url)
        try:
            stored = await conn.fetchval("SELECT seq FROM feed_state WHERE market = $1 AND channel = 'trades'", market)
        finally:
            await conn.close()
        assert {t["id"] for t in snapshot["data"]["trades"]} == trade_ids
        assert snapshot["seq"] == stored >= fresh["trades"] + 1

    # /healthz is ok again, and /metrics counts one reconnect (at least) per listener.
    assert (await health(base_url))["status"] == "ok"
    text = await read_metrics(base_url)
    for listener in ("feed", "stream"):
        assert metric(text, "gpux_listener_reconnects_total", listener) >= 1, listener
        assert metric(text, "gpux_listener_up", listener) == 1, listener


async def trades_of(admin: Api, market: str) -> list[dict]:
    model, tier = market.split("/")
    return (await admin.ok("GET", f"/v1/markets/{model}/{tier}/trades"))["items"]


async def test_feed_and_stream_recover_after_their_listen_backends_are_terminated(
        tmp_path, pg_server_url: str, template_db: str) -> None:
    db_url = await create_database(pg_server_url, template_db)
    server = start_server(tmp_path, database_url=db_url, extra_env=LISTEN_ENV)

    async def terminate_listeners(admin: Api, during: Callable[[], Awaitable[None]]) -> None:
        conn = await asyncpg.connect(db_url)
        try:
            # Only this test's database; the listeners are the connections that ran LISTEN (named
            # gpux-listen-* since the fix).
            killed = await conn.fetchval(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND (application_name LIKE 'gpux-listen-%' OR query LIKE 'LISTEN %')")
        finally:
            await conn.close()
        assert killed == 2  # the feed's and the stream's
        seen = await wait_health(server.base_url, lambda h: h["status"] == "degraded", "degraded")
        assert seen[-1]["database"] == "ok" and "down" in seen[-1]["listeners"].values()
        await during()
        await wait_health(server.base_url, lambda h: h["status"] == "ok", "ok again")

    try:
        await run_scenario(server.base_url, db_url, terminate_listeners)
        log = server.log()
        assert "LISTEN connection feed lost" in log and "LISTEN connection stream lost" in log
    finally:
        server.stop()


async def test_feed_and_stream_recover_after_postgresql_restarts(tmp_path) -> None:
    from exchange.db.embedded import start_embedded, stop_embedded

    # Its own PostgreSQL (never the shared one), stopped and started under the live server. Its data
    # lives outside pytest's numbered temporary folders, which a concurrent pytest run may delete.
    pg_home = Path(tempfile.mkdtemp(prefix="gpux-listen-pg-"))
    pg, db_url = await asyncio.to_thread(start_embedded, pg_home)
    try:
        server = start_server(tmp_path, database_url=db_url, extra_env=LISTEN_ENV)
        try:
            async def restart_postgres(admin: Api, during: Callable[[], Awaitable[None]]) -> None:
                await asyncio.to_thread(pg.stop)  # pg_ctl stop (fast): every backend is terminated
                seen = await wait_health(server.base_url, lambda h: h["status"] == "down", "down")
                assert seen[-1]["listeners"] == {"feed": "down", "stream": "down"}
                await asyncio.to_thread(_start_again, pg)
                assert pg.get_uri() in db_url.replace("/gpux?", "/postgres?")  # same socket, same URL
                await wait_health(server.base_url, lambda h: h["status"] == "ok", "ok again")
                await during()

            await run_scenario(server.base_url, db_url, restart_postgres)
            log = server.log()
            assert "LISTEN connection feed lost" in log and "LISTEN connection stream lost" in log
        finally:
            server.stop()
    finally:
        stop_embedded(pg)
        shutil.rmtree(pg_home, ignore_errors=True)


def _start_again(pg) -> None:
    with pg._lock:
        pg.ensure_postgres_running()
