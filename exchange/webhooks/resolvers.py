"""The destination check as configured, and its name lookups (GPUX_WEBHOOK_RESOLVE): `system` asks the machine's resolver
(getaddrinfo, in threads of its own so a slow name server holds none of the event loop's); `hosts`
reads the hosts file only and sends no query anywhere (closed networks, the test suite)."""
from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections import Counter
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


class Busy(Exception):
    """Too many checks of one account in flight (a 429)."""


class Destinations:
    """The webhook destination check as configured: the lookup (GPUX_WEBHOOK_RESOLVE) and the
    operator's allowance (GPUX_WEBHOOK_ALLOWED_NETS). One per process, shared by create and delivery."""

    def __init__(self, resolve: Resolver, allowed: tuple[IPNetwork, ...] = (),
                 executor: ThreadPoolExecutor | None = None, account_cap: int = 4) -> None:
        self.resolve = resolve
        self.allowed = allowed
        self.executor = executor
        # Checks one account may have in flight at create: slow names of one account (a name server
        # that never answers) never take the lookup threads everyone's checks share.
        self.account_cap = account_cap
        self.in_flight: Counter[int] = Counter()

    @classmethod
    def from_settings(cls, settings: Settings) -> "Destinations":
        allowed = parse_nets(settings.webhook_allowed_nets)
        if settings.webhook_resolve == "hosts":
            return cls(hosts_resolver(), allowed)
        # Lookup threads for every attempt in flight and as many creates again; a lookup given up at
        # the timeout may hold its thread a while longer (the C resolver's own timeout).
        executor = ThreadPoolExecutor(max_workers=2 * settings.webhook_concurrency, thread_name_prefix="webhook-lookup")
        return cls(system_resolver(executor, settings.webhook_timeout_s), allowed, executor,
                   settings.webhook_account_concurrency)

    async def check(self, url: str, account_id: int | None = None) -> Destination:
        """The destination of `url`, every address checked; Refused with why. With `account_id` (a
        create), Busy when that account already has its share of checks in flight."""
        if account_id is None:
            return await check_url(url, self.resolve, self.allowed)
        if self.in_flight[account_id] >= self.account_cap:
            raise Busy(f"at most {self.account_cap} webhook URL checks at a time per account")
        self.in_flight[account_id] += 1
        try:
            return await check_url(url, self.resolve, self.allowed)
        finally:
            self.in_flight[account_id] -= 1
            if self.in_flight[account_id] <= 0:
                del self.in_flight[account_id]

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
