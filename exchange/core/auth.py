"""API keys and agent tokens (stored as SHA-256: they are 256-bit random, so a fast hash is safe),
the request's principal, and role guards."""
from __future__ import annotations

import hashlib
import secrets

import asyncpg
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult

from exchange.core.structs import Struct

ROLES = ("admin", "owner", "tenant", "trader")
API_KEY_PREFIX = "gpx_"
AGENT_TOKEN_PREFIX = "gpa_"


class Principal(Struct, frozen=True, kw_only=True):
    """Who is calling: an account (by role) or a host agent (role 'agent', scoped to one host)."""
    role: str | None
    account_id: int | None = None
    host_id: int | None = None

    @property
    def anonymous(self) -> bool:
        return self.role is None


ANONYMOUS = Principal(role=None)


def new_api_key() -> str:
    return API_KEY_PREFIX + secrets.token_urlsafe(32)


def new_agent_token() -> str:
    return AGENT_TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def parse_authorization(header: str) -> str | None:
    """The token of an Authorization header, read leniently and the same way everywhere (HTTP, the
    stream, the rate limiter): the scheme in any case, any whitespace around and between. None when
    it is not `Bearer <token>`."""
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


def bearer_token(connection: ASGIConnection) -> str | None:
    header = connection.headers.get("authorization")
    if header is None:
        return None
    token = parse_authorization(header)
    if token is None:
        raise NotAuthorizedException("the Authorization header must be 'Bearer <api key>'")
    return token


class PrincipalCache:
    """Recently resolved keys, so a busy client does not cost a database lookup per request. Short
    lived: a key's role or host never changes. Unknown keys are remembered too, for less long, so that
    repeating one costs no lookup (keys are 256-bit random: one unknown now is not created later)."""

    def __init__(self, ttl_s: float = 30.0, unknown_ttl_s: float = 10.0, max_entries: int = 100_000) -> None:
        self.ttl_s = ttl_s
        self.unknown_ttl_s = unknown_ttl_s
        self.max_entries = max_entries
        self._entries: dict[bytes, tuple[float, Principal]] = {}
        self._unknown: dict[bytes, float] = {}

    def get(self, digest: bytes, now: float) -> Principal | None:
        entry = self._entries.get(digest)
        if entry is None or entry[0] < now:
            return None
        return entry[1]

    def put(self, digest: bytes, principal: Principal, now: float) -> None:
        if len(self._entries) >= self.max_entries:
            self._entries.clear()
        self._entries[digest] = (now + self.ttl_s, principal)

    def known_unknown(self, digest: bytes, now: float) -> bool:
        expires = self._unknown.get(digest)
        return expires is not None and expires >= now

    def put_unknown(self, digest: bytes, now: float) -> None:
        if len(self._unknown) >= self.max_entries:
            self._unknown.clear()
        self._unknown[digest] = now + self.unknown_ttl_s


def principal_cache(ctx) -> PrincipalCache:
    """The process's one cache (HTTP authentication, the rate limiter and the stream share it)."""
    cache = ctx.extras.get("principals")
    if cache is None:
        cache = ctx.extras["principals"] = PrincipalCache()
    return cache


async def resolve_token(pool: asyncpg.Pool, token: str, cache: PrincipalCache | None = None) -> Principal | None:
    import time

    digest = hash_secret(token)
    now = time.monotonic()
    if cache is not None:
        cached = cache.get(digest, now)
        if cached is not None:
            return cached
        if cache.known_unknown(digest, now):
            return None
    principal = await _lookup(pool, token, digest)
    if cache is not None:
        if principal is not None:
            cache.put(digest, principal, now)
        else:
            cache.put_unknown(digest, now)
    return principal


async def _lookup(pool: asyncpg.Pool, token: str, digest: bytes) -> Principal | None:
    if token.startswith(AGENT_TOKEN_PREFIX):
        row = await pool.fetchrow("SELECT id, owner_id FROM hosts WHERE agent_token_hash = $1", digest)
        return Principal(role="agent", account_id=row["owner_id"], host_id=row["id"]) if row else None
    row = await pool.fetchrow("SELECT id, role FROM accounts WHERE api_key_hash = $1", digest)
    return Principal(role=row["role"], account_id=row["id"]) if row else None


class ApiKeyAuthentication(AbstractAuthenticationMiddleware):
    """No header: anonymous (public routes still answer, guarded ones say 401). A bad key: 401."""

    async def authenticate_request(self, connection: ASGIConnection) -> AuthenticationResult:
        token = bearer_token(connection)
        if token is None:
            return AuthenticationResult(user=ANONYMOUS, auth=None)
        ctx = connection.app.state.ctx
        principal = await resolve_token(ctx.pool, token, principal_cache(ctx))
        if principal is None:
            raise NotAuthorizedException("unknown API key")
        return AuthenticationResult(user=principal, auth=token)


def requires(*roles: str):
    """A guard admitting only the given roles ('agent' for host agent tokens)."""

    def guard(connection: ASGIConnection, _: BaseRouteHandler) -> None:
        if connection.scope.get("method") == "OPTIONS":
            # Litestar's own OPTIONS answer (204 and the Allow header, no body) on every path: it
            # shows nothing guarded, and authentication skips OPTIONS (CORS preflights carry no
            # key), so there is no principal to check here.
            return
        principal: Principal = connection.user
        if principal.anonymous:
            raise NotAuthorizedException("an API key is required (Authorization: Bearer <key>)")
        if principal.role not in roles:
            raise PermissionDeniedException(f"this needs the role {' or '.join(roles)}; the key is {principal.role}")

    guard.__name__ = f"requires_{'_'.join(roles)}"
    return guard
