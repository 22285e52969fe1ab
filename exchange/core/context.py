"""What every request handler and job shares: settings, the pool, the clock. Built once by the
lifespan and provided to handlers as `ctx`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import asyncpg

from exchange.core.clock import Clock
from exchange.core.settings import Settings


@dataclass(slots=True)
class AppContext:
    settings: Settings
    pool: asyncpg.Pool
    clock: Clock
    extras: dict[str, Any] = field(default_factory=dict)
    # Called by the matching leader after each committed tick with its TickSummary (the feed
    # publishes market data from here). A failing listener is logged, never fails the tick.
    tick_listeners: list[Callable[[Any], Awaitable[None]]] = field(default_factory=list)


def request_hash(payload: bytes) -> bytes:
    """The fingerprint of a create request, to tell a retry (same body) from a conflict."""
    import hashlib

    return hashlib.sha256(payload).digest()
