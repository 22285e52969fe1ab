"""The destination check as configured, and its name lookups (GPUX_WEBHOOK_RESOLVE): `system` asks the machine's resolver
(getaddrinfo, in threads of its own so a slow name server holds none of the event loop's); `hosts`
reads the hosts file only and sends no query anywhere (closed networks, the test suite)."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from exchange.core.settings import Settings
from exchange.webhooks.destinations import Destination, IPAddress, IPNetwork, Resolver, check_url, parse_nets

HOSTS_FILE = Path("/etc/hosts")


def hosts_entries(text: str) -> dict[str, list[IPAddress]]:
    """Name -> addresses, in file order, from a hosts file's text."""
    entries: dict[str, list[IPAddress]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = ipaddress.ip_address(fields[0])
        except ValueError:
            continue
        for name in fields[1:]:
            entries.setdefault(name.lower().rstrip("."), []).append(address)
    return entries


def hosts_resolver(path: Path = HOSTS_FILE) -> Resolver:
    async def resolve(host: str, port: int) -> list[IPAddress]:
        try:
            text = path.read_text()
        except OSError:
            text = ""
        found = hosts_entries(text).get(host.lower().rstrip("."))
        if not found:
            raise LookupError(host)
        return found

    return resolve


def system_resolver(executor: ThreadPoolExecutor, timeout_s: float) -> Resolver:
    async def resolve(host: str, port: int) -> list[IPAddress]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(loop.run_in_executor(
                executor, socket.getaddrinfo, host, port, 0, socket.SOCK_STREAM, socket.IPPROTO_TCP), timeout_s)
        except (OSError, UnicodeError, asyncio.TimeoutError):
            raise LookupError(host) from None
        addresses = []
        for family, _, _, _, sockaddr in infos:
            if family in (socket.AF_INET, socket.AF_INET6):
                addresses.append(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]))
        if not addresses:
            raise LookupError(host)
        return addresses

    return resolve


class Destinations:
    """The webhook destination check as configured: the lookup (GPUX_WEBHOOK_RESOLVE) and the
    operator's allowance (GPUX_WEBHOOK_ALLOWED_NETS). One per process, shared by create and delivery."""

    def __init__(self, resolve: Resolver, allowed: tuple[IPNetwork, ...] = (),
                 executor: ThreadPoolExecutor | None = None) -> None:
        self.resolve = resolve
        self.allowed = allowed
        self.executor = executor

    @classmethod
    def from_settings(cls, settings: Settings) -> "Destinations":
        allowed = parse_nets(settings.webhook_allowed_nets)
        if settings.webhook_resolve == "hosts":
            return cls(hosts_resolver(), allowed)
        # As many lookup threads as attempts in flight: a slow name server never queues another's lookup.
        executor = ThreadPoolExecutor(max_workers=settings.webhook_concurrency, thread_name_prefix="webhook-lookup")
        return cls(system_resolver(executor, settings.webhook_timeout_s), allowed, executor)

    async def check(self, url: str) -> Destination:
        return await check_url(url, self.resolve, self.allowed)

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
