"""Market data over real websockets (`/v1/feed`) and REST against a running `gpux serve`: snapshot then
updates in sequence, gap detection and resync from the REST book, a stalled subscriber cut off while
the others keep receiving."""
from __future__ import annotations

import asyncio
import json
import socket
import time

import httpx
import pytest
import websockets

from exchange.core.money import parse_money
from exchange.feed.client import FeedClient, ws_url
from tests.e2e.client import Api, in_hours, in_seconds, unique
from tests.support import start_server

TICK_S = 0.5  # the e2e server's GPUX_TICK_S


async def new_market(admin: Api, gpus: int = 8) -> tuple[str, Api, dict]:
    """A GPU model of its own (so other tests' orders don't interfere): its markets exist once the
    host reports its inventory."""
    owner = await admin.new_account("owner")
    model = f"M{unique('gpu').replace('-', '')}-80GB"
    host, _ = await owner.new_host(gpus=gpus, model=model, fabric=unique("pod"))
    return model, owner, host


async def cross(admin: Api, owner: Api, host: dict, model: str, *, floor: str = "1.80", gpus: int = 8,
                limits: tuple[str, ...] = ("3.00", "2.50"), resting: str | None = "2.00", delay_s: float = 1.5) -> Api:
    """An offer from `delay_s` ahead and bids that all rest before it arrives, then cross in one tick."""
    await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": gpus, "floor_price": floor,
                                                    "available_from": in_seconds(delay_s),
                                                    "available_until": in_hours(24)})
    tenant = await admin.new_account("tenant", deposit="1000.00")
    share = gpus // len(limits)
    for i, limit in enumerate(limits):
        await tenant.ok("POST", "/v1/bids", 201, json={"market": f"{model}/spot", "gpus": share, "duration_s": 3600,
                                                        "limit_price": limit, "client_order_id": unique("c")})
    if resting:
        await tenant.ok("POST", "/v1/bids", 201, json={"market": f"{model}/spot", "gpus": 4, "duration_s": 3600,
                                                        "limit_price": resting, "client_order_id": unique("r")})
    return tenant


async def read_until(client: FeedClient, predicate, timeout: float = 12 * TICK_S) -> list:
    """Messages received (and applied) until `predicate(messages)` holds."""
    seen: list = []
    deadline = time.monotonic() + timeout
    while not predicate(seen):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out; got {[(m.channel, m.type, m.seq) for m in seen]}"
        seen.append(await asyncio.wait_for(client.recv(), left))
    return seen


def rest_levels(book: dict) -> dict[str, list[tuple[int, int]]]:
    return {side: [(parse_money(lv["price"]), lv["gpus"]) for lv in book[side]] for side in ("bids", "asks")}


async def test_snapshot_then_updates_in_sequence_and_rest_agrees(admin: Api, server) -> None:
    model, owner, host = await new_market(admin)
    market = f"{model}/spot"
    async with FeedClient(server.base_url, [market]) as client:
        snapshots = await read_until(client, lambda s: sum(m.type == "snapshot" for m in s) == 4)
        assert {m.channel for m in snapshots} == {"ticker", "book", "trades", "candles"}

        await cross(admin, owner, host, model)
        messages = await read_until(client, lambda s: any(m.channel == "trades" and m.type == "update" for m in s)
                                    and any(m.channel == "candles" and m.type == "update" for m in s))

    # Every channel's updates go on from its snapshot's seq, one by one.
    first = {m.channel: m.seq for m in snapshots}
    for channel in ("ticker", "book", "trades", "candles"):
        seqs = [m.seq for m in messages if m.channel == channel and m.type == "update"]
        assert seqs == list(range(first[channel] + 1, first[channel] + 1 + len(seqs))), (channel, seqs)
    assert client.gaps == 0 and client.errors == []
    trades = [t for m in messages if m.channel == "trades" and m.type == "update" for t in m.data["trades"]]
    assert {t["price"] for t in trades} == {"2.00"} and sum(t["gpus"] for t in trades) == 8
    assert all(t["gpu_hours"] == t["gpus"] for t in trades)  # one-hour bids
    view = client.views[market]
    assert view.ticker["last"] == "2.00" and view.ticker["volume_24h_gpu_h"] == 8.0

    # REST agrees with the feed: the book with its seq, the ticker, trades, candles.
    model_, tier = market.split("/")
    api = admin.as_key(None)
    book = await api.ok("GET", f"/v1/markets/{model_}/{tier}/book")
    if book["seq"] == client.seq[(market, "book")]:
        assert rest_levels(book) == view.book_levels()
    assert (parse_money("2.00"), 4) in rest_levels(book)["bids"]  # the losing bid rests
    ticker = await api.ok("GET", f"/v1/markets/{model_}/{tier}/ticker")
    assert ticker["last"] == "2.00" and ticker["volume_24h_gpu_h"] == 8.0 and ticker["best_bid"] == "2.00"
    assert ticker["risk"]["market"] == market and ticker["risk"]["preempted_share"] == 0.0
    rest_trades = await api.ok("GET", f"/v1/markets/{model_}/{tier}/trades")
    assert [t["id"] for t in rest_trades["items"]] == [t["id"] for t in trades]
    for interval in ("1m", "5m", "1h"):
        candles = await api.ok("GET", f"/v1/markets/{model_}/{tier}/candles?interval={interval}")
        assert [(c["open"], c["close"], c["volume_gpu_h"]) for c in candles["items"]] == [("2.00", "2.00", 8.0)]
    risk = await api.ok("GET", f"/v1/markets/{model_}/{tier}/risk")
    assert risk["preemptions"] == 0 and risk["spot_gpu_hours"] == 8.0
    assert (await api.request("GET", f"/v1/markets/{model_}/{tier}/candles?interval=2m")).status_code == 422
    assert (await api.request("GET", "/v1/markets/NOPE/spot/book")).status_code == 404


async def test_a_gap_is_detected_and_resynced_from_the_rest_book(admin: Api, server) -> None:
    model, owner, host = await new_market(admin)
    market = f"{model}/spot"
    dropped: list[int] = []

    def lose_first_book_update(env) -> bool:  # the network loses one book update
        if env.channel == "book" and env.type == "update" and not dropped:
            dropped.append(env.seq)
            return True
        return False

    async with FeedClient(server.base_url, [market], ["book"], drop=lose_first_book_update) as client:
        await read_until(client, lambda s: any(m.type == "snapshot" for m in s))
        tenant = await admin.new_account("tenant", deposit="1000.00")
        # Each bid at its own tick: book updates one after another.
        for limit in ("1.10", "1.20", "1.30"):
            await tenant.ok("POST", "/v1/bids", 201, json={"market": market, "gpus": 2, "duration_s": 3600,
                                                            "limit_price": limit, "client_order_id": unique("g")})
            await read_until(client, lambda s: any(m.type == "update" for m in s))
        assert dropped and client.gaps == 1 and client.resyncs == 1
        book = await admin.ok("GET", f"/v1/markets/{model}/spot/book")
        assert client.seq[(market, "book")] == book["seq"]
        assert client.views[market].book_levels() == rest_levels(book)
        assert rest_levels(book)["bids"] == [(1_300_000, 2), (1_200_000, 2), (1_100_000, 2)]


@pytest.fixture(scope="module")
def small_buffers_server(tmp_path_factory: pytest.TempPathFactory, server_db: str):
    """The module's database, another server process whose subscribers may hold little unsent data."""
    proc = start_server(tmp_path_factory.mktemp("small"), database_url=server_db,
                        extra_env={"GPUX_SCHEDULER": "0", "GPUX_FEED_MAX_BUFFER_BYTES": "262144",
                                   "GPUX_FEED_MAX_BACKLOG": "64"})
    yield proc
    proc.stop()


async def test_a_stalled_subscriber_is_disconnected_and_the_others_keep_receiving(
        admin: Api, small_buffers_server) -> None:
    server = small_buffers_server
    model, owner, host = await new_market(admin)
    market = f"{model}/spot"
    tenant = await admin.new_account("tenant", deposit="1000.00")
    # A book with many levels, so that each snapshot is a few kilobytes.
    for i in range(40):
        await tenant.ok("POST", "/v1/bids", 201, json={"market": market, "gpus": 1, "duration_s": 60,
                                                        "limit_price": f"1.{i:02d}", "client_order_id": unique("s")})
    # Snapshots are only big once the book holds those 40 levels (the module's other server ticks
    # them in): wait for that, or the stalled client's snapshots fit in the kernel's buffers.
    async with httpx.AsyncClient(base_url=server.base_url) as http:
        for _ in range(100):
            book = (await http.get(f"/v1/markets/{market}/book")).json()
            if len(book["bids"]) >= 40:
                break
            await asyncio.sleep(0.2)
        assert len(book["bids"]) >= 40, book
    async with FeedClient(server.base_url, [market], ["book", "ticker"]) as healthy:
        await read_until(healthy, lambda s: sum(m.type == "snapshot" for m in s) == 2)
        # The stalled one: a raw socket with a tiny receive buffer that asks for snapshot after
        # snapshot and reads nothing.
        raw = socket.socket()
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.connect(("127.0.0.1", int(server.base_url.rsplit(":", 1)[1])))
        raw.setblocking(False)
        reader, writer = await asyncio.open_connection(sock=raw, limit=2 ** 16)
        writer.write(b"GET /v1/feed HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
        op = json.dumps({"op": "subscribe", "channels": ["book"], "markets": [market]}).encode()
        frame = bytes([0x81, 0x80 | len(op)]) + b"\0\0\0\0" + op  # masked with a zero key
        # ~15 MB of snapshots asked for: far more than the kernel buffers of a loopback socket (4 MB
        # here), so the server itself must hold, and then bound, the rest.
        for _ in range(12000):
            writer.write(frame)
            await writer.drain()
        # Meanwhile the healthy subscriber keeps getting its updates, in sequence.
        await tenant.ok("POST", "/v1/bids", 201, json={"market": market, "gpus": 1, "duration_s": 60,
                                                        "limit_price": "2.50", "client_order_id": unique("s")})
        await read_until(healthy, lambda s: any(m.channel == "book" and m.type == "update" for m in s))
        assert healthy.gaps == 0
        # The stalled one was cut off: its connection ends (the error envelope and close frame with
        # the reason are best effort: they can only follow megabytes the client never reads).
        ended = False
        try:
            async with asyncio.timeout(60):
                while await reader.read(2 ** 20):
                    pass
                ended = True
        except ConnectionResetError:
            ended = True
        finally:
            writer.close()
        assert ended
        metrics = await admin.ok("GET", "/v1/markets")  # the server is fine
        assert any(m["id"] == market for m in metrics)


async def test_bad_ops_get_errors_and_heartbeats_answer_pings(admin: Api, server) -> None:
    async with websockets.connect(ws_url(server.base_url)) as ws:
        await ws.send("not json")
        error = json.loads(await ws.recv())
        assert error["type"] == "error" and error["data"]["code"] == "bad_request"
        await ws.send(json.dumps({"op": "subscribe", "channels": ["book"], "markets": ["NOPE/spot"]}))
        error = json.loads(await ws.recv())
        assert error["type"] == "error" and error["data"]["code"] == "unknown_market" and error["market"] == "NOPE/spot"
        await ws.send(json.dumps({"op": "subscribe", "channels": ["depth"], "markets": ["NOPE/spot"]}))
        assert json.loads(await ws.recv())["data"]["code"] == "bad_request"
        await ws.send(json.dumps({"op": "ping"}))
        beat = json.loads(await ws.recv())
        assert beat["type"] == "heartbeat" and beat["seq"] is None and beat["data"] == {"seqs": {}}
