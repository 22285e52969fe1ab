"""Settings, read once from the environment into a frozen struct (SPEC §9)."""
from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import msgspec


WEBHOOK_RESOLVERS = ("system", "hosts")


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    database_url: str | None = None
    home: Path = Path(".gpux")
    admin_key: str | None = None
    # Bearer token for /metrics (the admin key is accepted too); unset with no admin key: no scraping.
    metrics_token: str | None = None
    tick_s: float = 2.0
    settle_s: float = 60.0
    fee_bps: int = 0
    max_gang_gpus: int = 1024
    max_duration_s: int = 30 * 24 * 3600
    min_duration_s: int = 60
    # Metering: a healthy sample covers at most this long (a lost sample is not billed beyond it).
    meter_max_gap_s: float = 5.0
    # A lease is closed (rest of its hold released) this long after its end, once late samples are in.
    settle_close_after_s: float = 30.0
    # An agent silent this long marks its host silent; this long, its leases end as failed.
    host_grace_s: float = 30.0
    host_fail_s: float = 300.0
    # How a reclaim picks the spot leases it ends (exchange/reclaims/victims.py).
    reclaim_strategy: str = "cheapest_first"
    # Requests per second per account or host (however its key is spelled), shared by every server
    # process on the database (exchange/core/limits.py).
    rate_limit_per_s: int = 200
    # Requests per second per client address without a key.
    rate_limit_per_address_per_s: int = 200
    # Quotes per second per account (POST /v1/bids/quote), within the request limit above: a quote
    # rebuilds its model's whole book (about 0.4 s of CPU with 100,000 open bids), a request does not.
    quote_limit_per_s: int = 10
    # Failed authentications per second per address. A key new to a process is charged here before
    # its lookup and given back once found, so a burst of new good keys from one address (a NAT, a
    # fleet starting) shares this budget for its first second: hence not too small.
    auth_failures_per_s: int = 50
    # Requests a process reserves at a time from a shared limit (0: a tenth of the limit).
    rate_limit_slice: int = 0
    # Open websockets per client address (/v1/feed and /v1/stream) and per account (/v1/stream), all processes.
    ws_per_address: int = 100
    ws_per_account: int = 16
    # Markets one /v1/feed subscribe message may name.
    ws_max_markets_per_subscribe: int = 64
    run_scheduler: bool = True
    # LISTEN connections (feed, stream): first reconnect delay, its doubling bound, and how often a
    # live one is checked with SELECT 1 (exchange/core/listener.py).
    listen_retry_min_s: float = 0.1
    listen_retry_max_s: float = 5.0
    listen_check_s: float = 5.0
    # Webhooks (exchange/webhooks/delivery.py): the wait after a failed attempt (doubling from min to
    # max), one POST's timeout, and how often the loop looks for due retries (new events wake it).
    webhook_retry_min_s: float = 1.0
    webhook_retry_max_s: float = 300.0
    webhook_timeout_s: float = 5.0
    webhook_poll_s: float = 1.0
    # Networks a webhook may reach although they are internal (comma-separated CIDRs; empty: none).
    # Refused otherwise: loopback, private, link-local, shared, reserved, ... (exchange/webhooks/destinations.py).
    webhook_allowed_nets: str = ""
    # How a webhook URL's name is looked up: "system" (the machine's resolver) or "hosts" (the hosts
    # file only: no query leaves the machine; closed networks and the test suite).
    webhook_resolve: str = "system"
    # A webhook with no successful delivery for this long is disabled until its account re-enables it.
    webhook_disable_after_s: float = 3 * 24 * 3600.0
    # Delivery attempts in flight at once per process, and per account within that (one account's
    # slow receivers hold at most its own share).
    webhook_concurrency: int = 64
    webhook_account_concurrency: int = 4
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> "Settings":
        env = os.environ if environ is None else environ
        d = cls()  # the defaults, written once above
        values: dict[str, object] = {
            "database_url": env.get("DATABASE_URL") or None,
            "home": Path(env.get("GPUX_HOME", ".gpux")),
            "admin_key": env.get("GPUX_ADMIN_KEY") or None,
            "metrics_token": env.get("GPUX_METRICS_TOKEN") or None,
            "tick_s": float(env.get("GPUX_TICK_S", "2")),
            "settle_s": float(env.get("GPUX_SETTLE_S", "60")),
            "fee_bps": int(env.get("GPUX_FEE_BPS", "0")),
            "max_gang_gpus": int(env.get("GPUX_MAX_GANG_GPUS", "1024")),
            "min_duration_s": int(env.get("GPUX_MIN_DURATION_S", "60")),
            "meter_max_gap_s": float(env.get("GPUX_METER_MAX_GAP_S", "5")),
            "settle_close_after_s": float(env.get("GPUX_SETTLE_CLOSE_AFTER_S", "30")),
            "host_grace_s": float(env.get("GPUX_HOST_GRACE_S", "30")),
            "host_fail_s": float(env.get("GPUX_HOST_FAIL_S", "300")),
            "reclaim_strategy": env.get("GPUX_RECLAIM_STRATEGY", "cheapest_first"),
            "rate_limit_per_s": int(env.get("GPUX_RATE_LIMIT_PER_S", d.rate_limit_per_s)),
            "rate_limit_per_address_per_s": int(env.get("GPUX_RATE_LIMIT_PER_ADDRESS_PER_S",
                                                        d.rate_limit_per_address_per_s)),
            "quote_limit_per_s": int(env.get("GPUX_QUOTE_LIMIT_PER_S", d.quote_limit_per_s)),
            "auth_failures_per_s": int(env.get("GPUX_AUTH_FAILURES_PER_S", d.auth_failures_per_s)),
            "rate_limit_slice": int(env.get("GPUX_RATE_LIMIT_SLICE", d.rate_limit_slice)),
            "ws_per_address": int(env.get("GPUX_WS_PER_ADDRESS", d.ws_per_address)),
            "ws_per_account": int(env.get("GPUX_WS_PER_ACCOUNT", d.ws_per_account)),
            "ws_max_markets_per_subscribe": int(env.get("GPUX_WS_MAX_MARKETS_PER_SUBSCRIBE",
                                                        d.ws_max_markets_per_subscribe)),
            "run_scheduler": env.get("GPUX_SCHEDULER", "1") not in ("0", "false", "no"),
            "listen_retry_min_s": float(env.get("GPUX_LISTEN_RETRY_MIN_S", d.listen_retry_min_s)),
            "listen_retry_max_s": float(env.get("GPUX_LISTEN_RETRY_MAX_S", d.listen_retry_max_s)),
            "listen_check_s": float(env.get("GPUX_LISTEN_CHECK_S", d.listen_check_s)),
            "webhook_retry_min_s": float(env.get("GPUX_WEBHOOK_RETRY_MIN_S", d.webhook_retry_min_s)),
            "webhook_retry_max_s": float(env.get("GPUX_WEBHOOK_RETRY_MAX_S", d.webhook_retry_max_s)),
            "webhook_timeout_s": float(env.get("GPUX_WEBHOOK_TIMEOUT_S", d.webhook_timeout_s)),
            "webhook_poll_s": float(env.get("GPUX_WEBHOOK_POLL_S", d.webhook_poll_s)),
            "webhook_allowed_nets": env.get("GPUX_WEBHOOK_ALLOWED_NETS", d.webhook_allowed_nets),
            "webhook_resolve": env.get("GPUX_WEBHOOK_RESOLVE", d.webhook_resolve),
            "webhook_disable_after_s": float(env.get("GPUX_WEBHOOK_DISABLE_AFTER_S", d.webhook_disable_after_s)),
            "webhook_concurrency": int(env.get("GPUX_WEBHOOK_CONCURRENCY", d.webhook_concurrency)),
            "webhook_account_concurrency": int(env.get("GPUX_WEBHOOK_ACCOUNT_CONCURRENCY",
                                                       d.webhook_account_concurrency)),
            "log_level": env.get("GPUX_LOG_LEVEL", "INFO"),
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.tick_s <= 0 or self.settle_s <= 0:
            raise ValueError("GPUX_TICK_S and GPUX_SETTLE_S must be positive")
        if not 0 <= self.fee_bps <= 10_000:
            raise ValueError("GPUX_FEE_BPS must be between 0 and 10000")
        if not 0 < self.host_grace_s <= self.host_fail_s:
            raise ValueError("GPUX_HOST_GRACE_S must be positive and at most GPUX_HOST_FAIL_S")
        from exchange.reclaims.victims import VICTIM_STRATEGIES

        if self.reclaim_strategy not in VICTIM_STRATEGIES:
            raise ValueError(f"GPUX_RECLAIM_STRATEGY must be one of {', '.join(sorted(VICTIM_STRATEGIES))}")
        for name in ("rate_limit_per_s", "rate_limit_per_address_per_s", "quote_limit_per_s", "auth_failures_per_s",
                     "ws_per_address",
                     "ws_per_account", "ws_max_markets_per_subscribe", "webhook_concurrency",
                     "webhook_account_concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"GPUX_{name.upper()} must be at least 1")
        if self.rate_limit_slice < 0:
            raise ValueError("GPUX_RATE_LIMIT_SLICE must be 0 (a tenth of each limit) or positive")
        if not 0 < self.listen_retry_min_s <= self.listen_retry_max_s or self.listen_check_s <= 0:
            raise ValueError("GPUX_LISTEN_RETRY_MIN_S must be positive and at most GPUX_LISTEN_RETRY_MAX_S;"
                             " GPUX_LISTEN_CHECK_S positive")
        if not 0 < self.webhook_retry_min_s <= self.webhook_retry_max_s or self.webhook_timeout_s <= 0 \
                or self.webhook_poll_s <= 0:
            raise ValueError("GPUX_WEBHOOK_RETRY_MIN_S must be positive and at most GPUX_WEBHOOK_RETRY_MAX_S;"
                             " GPUX_WEBHOOK_TIMEOUT_S and GPUX_WEBHOOK_POLL_S positive")
        if self.webhook_disable_after_s <= 0:
            raise ValueError("GPUX_WEBHOOK_DISABLE_AFTER_S must be positive")
        if self.webhook_resolve not in WEBHOOK_RESOLVERS:
            raise ValueError(f"GPUX_WEBHOOK_RESOLVE must be one of {', '.join(WEBHOOK_RESOLVERS)}")
        for net in self.webhook_allowed_nets.split(","):
            try:
                if net.strip():
                    ipaddress.ip_network(net.strip(), strict=False)
            except ValueError:
                raise ValueError(f"GPUX_WEBHOOK_ALLOWED_NETS: {net.strip()!r} is not a CIDR") from None
        if self.max_gang_gpus < 1:
            raise ValueError("GPUX_MAX_GANG_GPUS must be at least 1")
