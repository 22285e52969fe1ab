"""`gpux bench feed`: N websocket subscribers on a local `gpux serve`, ticks published at the auction
rate through the feed's real path (sequenced updates stored in `feed_state`, PostgreSQL NOTIFY via
the channels backend, the server's hub, the websocket), tick-to-client latency p50/p99 and messages
delivered per second; against a bare websocket echo server (the `websockets` library, no framework)
on the same machine in the same run, driven by the same clients.

The clients are a minimal websocket protocol (handshake, frame parsing, masking) on asyncio: a load
generator must cost less than what it measures. Each message is stamped when its bytes arrive and
parsed after the run. Latency = arrival time - the envelope's `ts` (set by the publisher just before
it commits and notifies) for the feed; arrival time - send time for the echo."""
from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from exchange.core.net import free_port, wait_healthy

MARKET = "BENCH-80GB/spot"
CHANNELS = ["ticker", "book", "trades", "candles"]


# --- a minimal websocket client --------------------------------------------------------------------

class RawClient(asyncio.Protocol):
    def __init__(self, path: str, host: str, received: list) -> None:
        self.path, self.host, self.received = path, host, received
        self.buf = bytearray()
        self.open = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.handshaken = False
        self.closed = False

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write((f"GET {self.path} HTTP/1.1\r\nHost: {self.host}\r\nUpgrade: websocket\r\n"
                         f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())

    def data_received(self, data: bytes) -> None:
        now = time.time()
        buf = self.buf
        buf += data
        if not self.handshaken:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.open.set_exception(RuntimeError(bytes(buf[:200]).decode(errors="replace")))
                return
            del buf[:end + 4]
            self.handshaken = True
            self.open.set_result(None)
        while len(buf) >= 2:
            opcode = buf[0] & 0x0F
            length = buf[1] & 0x7F
            header = 2
            if length == 126:
                if len(buf) < 4:
                    return
                length = struct.unpack_from("!H", buf, 2)[0]
                header = 4
            elif length == 127:
                if len(buf) < 10:
                    return
                length = struct.unpack_from("!Q", buf, 2)[0]
                header = 10
            if len(buf) < header + length:
                return
            payload = bytes(buf[header:header + length])
            del buf[:header + length]
            if opcode in (1, 2):
                self.received.append((now, payload))
            elif opcode == 9:
                self._frame(0xA, payload)
            elif opcode == 8:
                self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.open.done():
            self.open.set_exception(ConnectionError("closed during the handshake"))

    def _frame(self, opcode: int, payload: bytes) -> None:
        key = os.urandom(4)
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 65536:
            head += bytes([0x80 | 126]) + struct.pack("!H", n)
        else:
            head += bytes([0x80 | 127]) + struct.pack("!Q", n)
        mask = (key * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(mask, "big")).to_bytes(n, "big") if n else b""
        self.transport.write(head + key + masked)

    def send_text(self, text: str) -> None:
        self._frame(0x1, text.encode())

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self._frame(0x8, struct.pack("!H", 1000))
            self.transport.close()


async def connect_many(port: int, path: str, n: int, received: list) -> list[RawClient]:
    loop = asyncio.get_running_loop()
    clients: list[RawClient] = []
    for start in range(0, n, 100):
        batch = []
        for _ in range(start, min(n, start + 100)):
            _, proto = await loop.create_connection(lambda: RawClient(path, f"127.0.0.1:{port}", received),
                                                    "127.0.0.1", port)
            batch.append(proto)
        await asyncio.gather(*(c.open for c in batch))
        clients += batch
    return clients


# --- the bare echo server (its own process, like the real server) ---------------------------------

def echo_server(port: int) -> None:
    import websockets.asyncio.server as ws_server

    async def echo(ws) -> None:
        async for message in ws:
            await ws.send(message)

    async def main() -> None:
        async with ws_server.serve(echo, "127.0.0.1", port, max_queue=None, ping_interval=None):
            print("ready", flush=True)
            await asyncio.Future()

    _fast_loop()
    asyncio.run(main())


def _fast_loop() -> None:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:  # pragma: no cover
        pass


# --- the run ---------------------------------------------------------------------------------------

def _ts_of(payload: bytes) -> float:
    i = payload.find(b'"ts":"') + 6
    return datetime.fromisoformat(payload[i:payload.index(b'"', i)].decode().replace("Z", "+00:00")).timestamp()


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def _tick_items(rng: random.Random, k: int, price: int) -> dict[str, dict]:
    """What one trading tick publishes for a market: ticker, a book change, a trade, the candle."""
    from exchange.core.money import format_money

    now = datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")
    p = format_money(price)
    return {
        "ticker": {"market": MARKET, "last": p, "indicative": p, "best_bid": p, "best_ask": p, "volume_24h_gpu_h": k * 8.0,
                   "trades_24h": k, "high_24h": p, "low_24h": p, "change_24h": "0.00", "change_24h_pct": 0.0,
                   "open_bids": 10, "last_trade_at": now, "risk": {}, "seq": 0, "at": now},
        "book": {"bids": [{"price": format_money(price - 10_000 * rng.randrange(1, 9)), "gpus": rng.randrange(0, 32)}],
                 "asks": [{"price": format_money(price + 10_000 * rng.randrange(1, 9)), "gpus": rng.randrange(0, 32)}]},
        "trades": {"trades": [{"id": k, "price": p, "gpus": 8, "duration_s": 3600, "gpu_hours": 8.0, "at": now}],
                   "preemptions": []},
        "candles": {"1m": {"t": now, "open": p, "high": p, "low": p, "close": p, "volume_gpu_h": 8.0, "trades": 1}},
    }


async def _run(subscribers: int, ticks: int, tick_s: float, channels: list[str], port: int, echo_port: int,
               dsn: str) -> dict:
    import asyncpg

    from exchange.feed.backend import PostgresFeedBackend
    from exchange.feed.publisher import publish_envelopes
    from exchange.feed.schemas import FEED_CHANNEL

    conn = await asyncpg.connect(dsn)
    await conn.execute("INSERT INTO markets (id, model, tier, created_at) VALUES ($1, 'BENCH-80GB', 'spot', now())"
                       " ON CONFLICT DO NOTHING", MARKET)
    backend = PostgresFeedBackend(lambda: asyncpg.connect(dsn))
    await backend.on_startup()
    rng = random.Random(1)

    # The feed: subscribe everyone, take the snapshots, then one trading tick every tick_s.
    received: list = []
    clients = await connect_many(port, "/v1/feed", subscribers, received)
    op = json.dumps({"op": "subscribe", "channels": channels, "markets": [MARKET]})
    for client in clients:
        client.send_text(op)
    while len(received) < subscribers * len(channels):
        await asyncio.sleep(0.05)
    snapshots = len(received)
    received.clear()
    started = time.time()
    price = 2_000_000
    for k in range(1, ticks + 1):
        price += 10_000 * rng.randrange(-3, 4)
        items = _tick_items(rng, k, price)
        for channel in channels:
            await publish_envelopes(conn, lambda p: backend.publish(p, [FEED_CHANNEL]), MARKET, channel,
                                    [items[channel]], lambda item: item)
        await asyncio.sleep(tick_s)
    expected = subscribers * len(channels) * ticks
    deadline = time.time() + 10
    while len(received) < expected and time.time() < deadline:
        await asyncio.sleep(0.05)
    feed = [(at, payload) for at, payload in received if b'"type":"update"' in payload]
    latencies = [1000 * (at - _ts_of(payload)) for at, payload in feed]
    elapsed = max(at for at, _ in feed) - started if feed else float("nan")
    for client in clients:
        client.close()
    await backend.on_shutdown()
    await conn.close()
    await asyncio.sleep(0.5)

    # The bare echo: the same clients, each sends a timestamped message per tick and times the echo.
    echoed: list = []
    clients = await connect_many(echo_port, "/", subscribers, echoed)
    for _ in range(ticks):
        for client in clients:
            client.send_text('{"ts":"%s"}' % datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"))
        await asyncio.sleep(tick_s)
    deadline = time.time() + 10
    while len(echoed) < subscribers * ticks and time.time() < deadline:
        await asyncio.sleep(0.05)
    echo = [1000 * (at - _ts_of(payload)) for at, payload in echoed]
    for client in clients:
        client.close()
    await asyncio.sleep(0.2)

    return {
        "subscribers": subscribers, "channels": len(channels), "ticks": ticks, "tick_s": tick_s,
        "p50_ms": round(statistics.median(latencies), 2) if latencies else None,
        "p99_ms": round(_pct(latencies, 0.99), 2), "max_ms": round(max(latencies), 2) if latencies else None,
        "msgs_per_s": round(len(feed) / elapsed, 1) if feed else 0.0,
        "messages": len(feed), "expected": expected, "snapshots": snapshots,
        "echo_p50_ms": round(statistics.median(echo), 2) if echo else None,
        "echo_p99_ms": round(_pct(echo, 0.99), 2), "echo_messages": len(echo),
    }


def run(subscribers: int = 1000, ticks: int = 10, tick_s: float = 2.0, channels: list[str] | None = None,
        workers: int = 1) -> dict:
    """Start PostgreSQL (DATABASE_URL, else an embedded one in a temp folder), `gpux serve` (`workers`
    processes sharing the subscribers, no auction: the bench publishes the ticks) and the echo
    server; measure; stop them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * subscribers + 256))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    channels = channels or CHANNELS
    with tempfile.TemporaryDirectory(prefix="gpux-bench-feed-") as tmp:
        home = Path(tmp)
        pg_server = None
        dsn = os.environ.get("DATABASE_URL")
        if not dsn:
            from exchange.db.embedded import start_embedded

            pg_server, dsn = start_embedded(home)
        port, echo_port = free_port(), free_port()
        env = dict(os.environ, DATABASE_URL=dsn, GPUX_HOME=str(home), GPUX_SCHEDULER="0", GPUX_LOG_LEVEL="WARNING",
                   GPUX_ADMIN_KEY="gpx_bench_" + base64.urlsafe_b64encode(os.urandom(24)).decode(),
                   # Every subscriber comes from this one address.
                   GPUX_WS_PER_ADDRESS=str(subscribers + 10))
        log = home / "server.log"
        with open(log, "wb") as out:
            server = subprocess.Popen([sys.executable, "-m", "exchange.cli", "serve", "--port", str(port),
                                       "--workers", str(workers)], env=env,
                                      stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        echo = subprocess.Popen([sys.executable, "-m", "loadtests.bench_feed", "echo", str(echo_port)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", server, 120, lambda log=log: log.read_text()[-3000:])
            assert echo.stdout.readline().strip() == "ready"
            _fast_loop()
            figures = asyncio.run(_run(subscribers, ticks, tick_s, channels, port, echo_port, dsn))
            return {**figures, "workers": workers}
        finally:
            for proc in (echo, server):
                proc.terminate()
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
            if pg_server is not None:
                from exchange.db.embedded import stop_embedded

                stop_embedded(pg_server)


def format_table(f: dict) -> str:
    ratio = f["p99_ms"] / f["echo_p99_ms"] if f["echo_p99_ms"] else float("nan")
    rows = [
        f"gpux bench feed: {f['subscribers']} subscribers x {f['channels']} channels, {f['ticks']} ticks every "
        f"{f['tick_s']} s (the auction rate), one `gpux serve` process",
        "",
        f"{'':26}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'messages':>10}{'msgs/s':>10}",
        f"{'gpux /v1/feed (tick→client)':26}{f['p50_ms']:>10}{f['p99_ms']:>10}{f['max_ms']:>10}"
        f"{f['messages']:>10}{f['msgs_per_s']:>10}",
        f"{'bare websocket echo (RTT)':26}{f['echo_p50_ms']:>10}{f['echo_p99_ms']:>10}{'':>10}{f['echo_messages']:>10}",
        "",
        f"feed p99 / echo p99: {ratio:.2f}   delivered {f['messages']} of {f['expected']} updates "
        f"(+{f['snapshots']} snapshots)   target p99 <= 100 ms: {'met' if f['p99_ms'] <= 100 else 'NOT met'}",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "echo":
        echo_server(int(sys.argv[2]))
