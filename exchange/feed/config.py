"""Feed settings, read once from the environment (beside the service's own Settings)."""
from __future__ import annotations

import os

import msgspec


class FeedSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # "postgres" (LISTEN/NOTIFY on the service's database) or a redis:// URL (needs the redis package).
    backend: str = "postgres"
    # Messages a subscriber may have queued, unsent, before it is disconnected as too slow.
    max_backlog: int = 1024
    # Bytes a subscriber's socket may hold unsent before it is disconnected as too slow.
    max_buffer_bytes: int = 4 * 1024 * 1024
    # A subscriber that received nothing for this long gets a heartbeat.
    heartbeat_s: float = 5.0
    # How long a slow subscriber's error message and close frame may take before we give up on it.
    close_timeout_s: float = 2.0
    # Market-and-channel subscriptions one connection may hold.
    max_subscriptions: int = 256

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> "FeedSettings":
        env = os.environ if environ is None else environ
        settings = cls(backend=env.get("GPUX_FEED_BACKEND", "postgres"),
                       max_backlog=int(env.get("GPUX_FEED_MAX_BACKLOG", "1024")),
                       max_buffer_bytes=int(env.get("GPUX_FEED_MAX_BUFFER_BYTES", str(4 * 1024 * 1024))),
                       heartbeat_s=float(env.get("GPUX_FEED_HEARTBEAT_S", "5")),
                       close_timeout_s=float(env.get("GPUX_FEED_CLOSE_TIMEOUT_S", "2")),
                       max_subscriptions=int(env.get("GPUX_FEED_MAX_SUBSCRIPTIONS", "256")))
        if settings.max_backlog < 1 or settings.heartbeat_s <= 0 or settings.max_subscriptions < 1:
            raise ValueError("GPUX_FEED_MAX_BACKLOG, GPUX_FEED_HEARTBEAT_S and GPUX_FEED_MAX_SUBSCRIPTIONS must be positive")
        if settings.backend != "postgres" and not settings.backend.startswith(("redis://", "rediss://")):
            raise ValueError("GPUX_FEED_BACKEND must be 'postgres' or a redis:// URL")
        return settings
