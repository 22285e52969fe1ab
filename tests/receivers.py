"""Webhook receivers for the tests, on loopback only: a real HTTP server that records what it is
sent, and a tarpit that accepts connections and never answers."""
from __future__ import annotations

import asyncio
import time

from tests.support import free_port


class Receiver:
    """A real HTTP server on a free port: records each POST (headers, body, arrival) and answers with
    the status in `answer` (500 to play a failing receiver); `stop()`/`start()` play one that is down."""

    def __init__(self, host: str = "127.0.0.1", answer: int = 200) -> None:
        self.host = host
        self.port = free_port()
        self.url = f"http://{host}:{self.port}/hook"
        self.answer = answer
        self.received: list[tuple[dict[str, str], bytes, float]] = []
        self.refused = 0  # requests answered with a non-2xx
        self.seen: list[dict[str, str]] = []  # the headers of every request, answered 2xx or not
        self.arrived = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.host, self.port)

    async def stop(self) -> None:
        self.server.close()
        for writer in list(self.open):  # kept-alive connections too: down means down
            writer.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.seen.append(headers)
                status = self.answer
                if status < 300:
                    self.received.append((headers, body, time.monotonic()))
                    self.arrived.set()
                else:
                    self.refused += 1
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.CancelledError, ConnectionError):
            pass
        finally:
            self.open.discard(writer)
            writer.close()

    async def wait_for(self, count: int, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()


class Tarpit:
    """Accepts connections on loopback, reads what comes, never answers."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.connections = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        try:
            while await reader.read(65536):
                pass
        except (ConnectionError, asyncio.CancelledError):
            pass

    async def stop(self) -> None:
        self.server.close()
        for writer in self.writers:
            writer.close()
