"""One delivery attempt over HTTP: check the URL's destination again (a name can change what it points
to), connect to the address checked with the original Host header and TLS name, POST, read the status.
No database here: nothing is held while a receiver takes its time."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass

import httpx

from exchange.webhooks.destinations import Refused
from exchange.webhooks.resolvers import Destinations

MAX_ERROR_CHARS = 500
USER_AGENT = "gpux-webhooks/1"


@dataclass(frozen=True, slots=True)
class Outcome:
    status: int | None
    error: str | None  # None: delivered (a 2xx)


class Sender:
    def __init__(self, destinations: Destinations, timeout_s: float, concurrency: int) -> None:
        self.destinations = destinations
        self.timeout_s = timeout_s
        # One connection per attempt (no keep-alive): each connection is to an address just checked,
        # and none is shared between two names that happen to point at one address.
        self.client = httpx.AsyncClient(
            timeout=timeout_s, follow_redirects=False, trust_env=False,
            limits=httpx.Limits(max_connections=concurrency, max_keepalive_connections=0))

    async def aclose(self) -> None:
        await self.client.aclose()

    async def send(self, url: str, body: bytes, headers: dict[str, str]) -> Outcome:
        """The whole attempt (lookup, connect, request, status) is bounded by the timeout."""
        try:
            async with asyncio.timeout(self.timeout_s):
                try:
                    destination = await self.destinations.check(url)
                except Refused as refused:
                    # Nothing was connected to: the log says why, never what might answer there.
                    return Outcome(None, f"refused: {refused}")
                address = destination.addresses[0]
                extensions = {"sni_hostname": destination.host} if destination.scheme == "https" else {}
                request_headers = {"Host": destination.host_header, "Content-Type": "application/json",
                                   "User-Agent": USER_AGENT, **headers}
                # Streamed and never read: only the status counts, and a large answer costs nothing.
                async with self.client.stream("POST", destination.url_for(address), content=body,
                                              headers=request_headers, extensions=extensions) as response:
                    status = response.status_code
        except TimeoutError:
            return Outcome(None, f"timed out after {self.timeout_s:g} s")
        except httpx.HTTPError as exc:
            return Outcome(None, f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS])
        if 200 <= status < 300:
            return Outcome(status, None)
        return Outcome(status, f"HTTP {status}")
