"""Request rate limits and websocket connection limits (SPEC §9), shared by every server process on
one database.

Who is counted:
- an authenticated request counts against its principal: the account (`acct:<id>`) or, for an agent
  token, the host (`host:<id>`), however the Authorization header is spelled;
- a request without a key counts against its client address (`addr:<ip>`);
- every failed authentication (an unknown key, a malformed header) counts against the address's
  failed-auth budget (`auth:<ip>`); a key this process does not know yet is charged there *before*
  its database lookup (and given back when it is good), so a client guessing keys is refused with
  429 without costing a query.

How it holds across processes: each limit is a fixed one-second window whose count lives in one
shared atomic counter (`WindowCounter`: PostgreSQL's UNLOGGED `rate_limit_counters`, an upsert that
adds and returns the total in one statement). A process does not pay a round trip per request: it
reserves a slice of the window's budget (GPUX_RATE_LIMIT_SLICE, by default a tenth of the limit)
and serves from it locally, so all processes together never serve more than the limit per window.
The price is that a process holding an unused slice can leave another refused a little early (at
most one slice per process per window).

Litestar's own RateLimitMiddleware was not used: it reads its store, then writes it back under a
lock of its own process (`Store` has no atomic increment), so two processes sharing a store both
count from the same value and serve up to twice the limit; it keys on whatever identity it is given
before authentication has resolved anything; and it costs a store read and write per request. A
Redis `WindowCounter` is INCRBY plus EXPIRE.

Open websockets are counted per key across processes too (`SharedConnectionLimits`)."""
from __future__ import annotations

import asyncio
import logging
import math
import time
from typing import Any, Protocol

import asyncpg
from litestar.enums import ScopeType
from litestar.exceptions import TooManyRequestsException
from litestar.middleware import ASGIMiddleware
from litestar.datastructures import MutableScopeHeaders
from litestar.types import ASGIApp, Message, Receive, Scope, Send

from exchange.core.auth import Principal, hash_secret, parse_authorization, principal_cache, resolve_token
from exchange.core.settings import Settings

log = logging.getLogger(__name__)
WINDOW_S = 1
# Rows of windows this much older than now are deleted, at most once per PRUNE_EVERY_S per process.
PRUNE_AFTER_S = 60
PRUNE_EVERY_S = 60.0


class WindowCounter(Protocol):
    """One atomic operation: add `n` to `key`'s count in window `window` (a window number; an older
    window's count is replaced, not added to) and return the count after adding."""

    async def add(self, key: str, window: int, n: int) -> int: ...


class PostgresWindowCounter:
    """The counter in the service's database (migration 0010: an UNLOGGED table, one row per key,
    updated in place). Unlogged: the counts are lost on a crash of PostgreSQL, which at worst gives
    every client a fresh second. While the database cannot be reached, this process counts alone
    (`fallback`), so a limit still holds per process and no request fails because of its count."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.fallback = MemoryWindowCounter()
        self._pruned_at = time.monotonic()
        self._warned_at = -math.inf

    async def add(self, key: str, window: int, n: int) -> int:
        try:
            hits = await self.pool.fetchval(
                "INSERT INTO rate_limit_counters AS c (key, window_s, hits) VALUES ($1, $2, $3)"
                " ON CONFLICT (key) DO UPDATE SET"
                "  hits = CASE WHEN c.window_s = EXCLUDED.window_s THEN c.hits + EXCLUDED.hits"
                "              WHEN c.window_s < EXCLUDED.window_s THEN EXCLUDED.hits"
                "              ELSE c.hits END,"  # a process whose clock lags: counted in the newer window
                "  window_s = GREATEST(c.window_s, EXCLUDED.window_s)"
                " RETURNING hits", key, window, n)
            now = time.monotonic()
            if now - self._pruned_at >= PRUNE_EVERY_S:
                self._pruned_at = now
                await self.pool.execute("DELETE FROM rate_limit_counters WHERE window_s < $1",
                                        window - PRUNE_AFTER_S)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            now = time.monotonic()
            if now - self._warned_at >= 60:
                self._warned_at = now
                log.warning("rate limits counted per process: the shared counter failed (%s)", exc)
            return await self.fallback.add(key, window, n)
        return hits


class MemoryWindowCounter:
    """This process only (a single-process service, or tests of the limiter itself)."""

    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, int]] = {}

    async def add(self, key: str, window: int, n: int) -> int:
        current_window, hits = self._counts.get(key, (window, 0))
        hits = hits + n if current_window == window else n
        if len(self._counts) > 100_000:
            self._counts.clear()
        self._counts[key] = (window, hits)
        return hits


class _Budget:
    """This process's share of one key's budget in one window."""
    __slots__ = ("window", "available", "exhausted", "last_total", "reserving")

    def __init__(self, window: int) -> None:
        self.window = window
        # One reservation at a time: concurrent requests finding the slice used up wait for it, instead
        # of each reserving a slice (a burst would reserve far past the limit and refuse its own tail).
        self.reserving = asyncio.Lock()
        self.available = 0  # reserved from the shared counter, not yet used
        self.exhausted = False  # the shared count reached the limit: nothing more this window
        self.last_total = 0  # the shared count after our latest reservation


class Decision:
    __slots__ = ("allowed", "limit", "remaining", "reset_s")

    def __init__(self, allowed: bool, limit: int, remaining: int, reset_s: int) -> None:
        self.allowed = allowed
        self.limit = limit
        self.remaining = remaining
        self.reset_s = reset_s

    def headers(self) -> dict[str, str]:
        headers = {"RateLimit-Policy": f"{self.limit}; w={WINDOW_S}", "RateLimit-Limit": str(self.limit),
                   "RateLimit-Remaining": str(self.remaining), "RateLimit-Reset": str(self.reset_s)}
        if not self.allowed:
            headers["Retry-After"] = str(self.reset_s)
        return headers


class RateLimiter:
    def __init__(self, counter: WindowCounter, slice_size: int = 0, clock=time.time) -> None:
        self.counter = counter
        self.slice_size = slice_size  # 0: a tenth of each limit
        self.clock = clock
        self._window = 0
        self._budgets: dict[str, _Budget] = {}

    def _slice(self, limit: int) -> int:
        return min(limit, self.slice_size or max(1, limit // 10))

    async def take(self, key: str, limit: int) -> Decision:
        """Use one request of `key`'s budget of `limit` per window, reserving a slice from the shared
        counter when this process has none left."""
        now = self.clock()
        window = int(now // WINDOW_S)
        reset_s = max(1, math.ceil((window + 1) * WINDOW_S - now))
        if window != self._window:  # a new window: every budget starts over (and memory stays bounded)
            self._window = window
            self._budgets = {}
        budget = self._budgets.get(key)
        if budget is None:
            budget = self._budgets[key] = _Budget(window)
        while budget.available == 0 and not budget.exhausted:
            async with budget.reserving:
                if budget.available or budget.exhausted:  # another request's reservation came first
                    break
                size = self._slice(limit)
                total = await self.counter.add(key, window, size)
                granted = max(0, min(size, limit - (total - size)))
                if self._budgets.get(key) is not budget:
                    # The window turned while we waited: this request counts in the one it reserved in.
                    return Decision(granted > 0, limit, max(0, limit - total), reset_s)
                budget.available += granted
                budget.last_total = max(budget.last_total, total)
                budget.exhausted = granted < size
        if budget.available == 0:
            budget.exhausted = True
            return Decision(False, limit, 0, reset_s)
        budget.available -= 1
        return Decision(True, limit, max(0, limit - budget.last_total + budget.available), reset_s)


    def give_back(self, key: str) -> None:
        """Return one request to `key`'s budget in this process (this window only): a charge that, as
        it turned out, should not have counted."""
        budget = self._budgets.get(key)
        if budget is not None and budget.window == self._window:
            budget.available += 1


async def take_quote(ctx: Any, account_id: int) -> None:
    """Charge one quote to the account's quote budget (its own key beside the request budget, shared
    by every process like it), or refuse with 429 and Retry-After."""
    decision = await limiter_of(ctx).take(f"quote:{account_id}", ctx.settings.quote_limit_per_s)
    if not decision.allowed:
        raise _too_many(decision, "per account to POST /v1/bids/quote")


def _too_many(decision: Decision, what: str) -> TooManyRequestsException:
    return TooManyRequestsException(
        detail=f"rate limit: at most {decision.limit} requests per second {what}; retry after {decision.reset_s} s",
        headers=decision.headers())


def principal_key(principal: Principal) -> str:
    return f"host:{principal.host_id}" if principal.role == "agent" else f"acct:{principal.account_id}"


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else "unknown"


def limiter_of(ctx: Any) -> RateLimiter:
    limiter = ctx.extras.get("rate_limiter")
    if limiter is None:
        limiter = ctx.extras["rate_limiter"] = RateLimiter(PostgresWindowCounter(ctx.pool),
                                                           ctx.settings.rate_limit_slice)
    return limiter


async def authenticate_limited(ctx: Any, token: str, address: str) -> Principal | None:
    """The principal of `token`, or None if it is unknown. A key this process does not already know
    (a lookup, or an unknown key remembered as such) is charged to the address's failed-auth budget
    first (and given back when it turns out good), so once that is spent a client trying keys is
    refused (TooManyRequestsException) without a query; a known key costs nothing here. A good new
    key from an address that spent its budget waits for the next window too."""
    settings: Settings = ctx.settings
    cache = principal_cache(ctx)
    digest = hash_secret(token)
    principal = cache.get(digest, time.monotonic())
    if principal is not None:
        return principal
    limiter = limiter_of(ctx)
    key = f"auth:{address}"
    decision = await limiter.take(key, settings.auth_failures_per_s)
    if not decision.allowed:
        raise _too_many(decision, "of authentication failures (or new keys) from this address")
    principal = await resolve_token(ctx.pool, token, cache)
    if principal is not None:
        limiter.give_back(key)  # a good key's first lookup is no failure
    return principal


class RateLimitMiddleware(ASGIMiddleware):
    """Runs before authentication (which then finds the key in the principal cache: no second lookup)."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, exclude: tuple[str, ...] = ()) -> None:
        self.exclude_path_pattern = exclude

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        ctx = scope["litestar_app"].state.ctx
        settings: Settings = ctx.settings
        limiter = limiter_of(ctx)
        address = client_address(scope)
        header = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        if header is None:
            decision = await limiter.take(f"addr:{address}", settings.rate_limit_per_address_per_s)
            what = "from this address without a key"
        else:
            token = parse_authorization(header)
            if token is None:  # authentication will say 401
                decision = await limiter.take(f"auth:{address}", settings.auth_failures_per_s)
                what = "of authentication failures from this address"
            else:
                principal = await authenticate_limited(ctx, token, address)
                if principal is None:  # charged as a failure already; authentication will say 401
                    await next_app(scope, receive, send)
                    return
                decision = await limiter.take(principal_key(principal), settings.rate_limit_per_s)
                what = "per account or host"
        if not decision.allowed:
            raise _too_many(decision, what)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableScopeHeaders(message)
                for key, value in decision.headers().items():
                    headers[key] = value
            await send(message)

        await next_app(scope, receive, send_with_headers)


class ConnectionLimits:
    """Open websockets per key, counted in this process only."""

    def __init__(self) -> None:
        self._open: dict[str, int] = {}

    def acquire(self, key: str, limit: int) -> bool:
        count = self._open.get(key, 0)
        if count >= limit:
            return False
        self._open[key] = count + 1
        return True

    def release(self, key: str) -> None:
        count = self._open.get(key, 0) - 1
        if count > 0:
            self._open[key] = count
        else:
            self._open.pop(key, None)


class Slot:
    """One admitted socket: its key, and the process identity it was counted under in the database
    (None: counted in this process only)."""
    __slots__ = ("key", "owner")

    def __init__(self, key: str, owner: tuple[int, Any] | None) -> None:
        self.key = key
        self.owner = owner


_DB_ERRORS = (OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
# How long an admission waits for the database before counting in this process alone.
DB_TIMEOUT_S = 5.0


class SharedConnectionLimits:
    """Open websockets per key (`addr:<ip>`, `acct:<id>`), counted across the server processes on
    one database (migration 0010's `ws_connections`). Each process is named by a session it holds
    open (pid and start time): the sockets of a process that died stop counting as soon as its session
    is gone, without a heartbeat. An admission is one short transaction, serialised per key by an
    advisory lock; while the database cannot be reached the process counts alone."""

    def __init__(self, pool: asyncpg.Pool, dsn: str) -> None:
        self.pool = pool
        self.dsn = dsn
        self.local = ConnectionLimits()
        self._identity: asyncpg.Connection | None = None
        self._owner: tuple[int, Any] | None = None
        self._connecting = asyncio.Lock()
        self._warned_at = -math.inf

    async def _owner_id(self) -> tuple[int, Any]:
        async with self._connecting:
            if self._identity is None or self._identity.is_closed():
                conn = await asyncpg.connect(self.dsn, timeout=DB_TIMEOUT_S)
                try:
                    row = await conn.fetchrow(
                        "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()")
                    # Forget the sockets of processes that are gone (this one's earlier session too).
                    await conn.execute("DELETE FROM ws_connections w WHERE NOT EXISTS (SELECT 1 FROM pg_stat_activity a"
                                       " WHERE a.pid = w.owner_pid AND a.backend_start = w.owner_start)")
                except BaseException:
                    await conn.close()
                    raise
                self._identity, self._owner = conn, (row["pid"], row["backend_start"])
            assert self._owner is not None
            return self._owner

    async def acquire(self, key: str, limit: int) -> Slot | None:
        """A slot for one more socket of `key`, or None when `limit` are open (in all processes)."""
        try:
            owner = await self._owner_id()
            async with self.pool.acquire(timeout=DB_TIMEOUT_S) as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 11))", key)
                open_now = await conn.fetchval("SELECT coalesce(sum(sockets), 0) FROM ws_connections WHERE key = $1",
                                               key)
                if open_now >= limit:
                    # Before refusing, forget the sockets of processes that are gone (only rows of
                    # dead sessions can make the count too high, so this is needed only here).
                    await conn.execute(
                        "DELETE FROM ws_connections w WHERE key = $1 AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a"
                        " WHERE a.pid = w.owner_pid AND a.backend_start = w.owner_start)", key)
                    open_now = await conn.fetchval(
                        "SELECT coalesce(sum(sockets), 0) FROM ws_connections WHERE key = $1", key)
                    if open_now >= limit:
                        return None
                await conn.execute(
                    "INSERT INTO ws_connections AS w (key, owner_pid, owner_start, sockets) VALUES ($1, $2, $3, 1)"
                    " ON CONFLICT (key, owner_pid, owner_start) DO UPDATE SET sockets = w.sockets + 1", key, *owner)
            return Slot(key, owner)
        except _DB_ERRORS as exc:
            self._warn(exc)
            return Slot(key, None) if self.local.acquire(key, limit) else None

    async def release(self, slot: Slot) -> None:
        if slot.owner is None:
            self.local.release(slot.key)
            return
        try:
            async with self.pool.acquire(timeout=DB_TIMEOUT_S) as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 11))", slot.key)
                left_open = await conn.fetchval(
                    "UPDATE ws_connections SET sockets = sockets - 1"
                    " WHERE key = $1 AND owner_pid = $2 AND owner_start = $3 RETURNING sockets", slot.key, *slot.owner)
                if left_open is not None and left_open <= 0:
                    await conn.execute("DELETE FROM ws_connections WHERE key = $1 AND owner_pid = $2"
                                       " AND owner_start = $3", slot.key, *slot.owner)
        except _DB_ERRORS as exc:  # the row stays until this process's session ends
            self._warn(exc)

    async def close(self) -> None:
        if self._identity is not None:
            await self._identity.close()

    def _warn(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning("websocket limits counted per process: the shared count failed (%s)", exc)


def connection_limits(ctx: Any) -> SharedConnectionLimits:
    limits = ctx.extras.get("ws_connections")
    if limits is None:
        dsn = ctx.settings.database_url or ctx.extras["database_url"]
        limits = ctx.extras["ws_connections"] = SharedConnectionLimits(ctx.pool, dsn)
    return limits
