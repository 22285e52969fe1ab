"""Wire shapes between the host agent and the exchange (SPEC §9), plus time formatting.

Requests the agent *sends* are strict structs (``forbid_unknown_fields``): they are ours, and a
typo in them should fail loudly in tests. Replies the agent *reads* are lenient: SPEC §9 lets the
exchange add fields to any answer, so refusing unknown fields there would break old agents the
day the server grows a field.

Optional request fields are omitted when unset (``omit_defaults``) so that a server that only
knows the fixed §9 shape sees exactly that shape.
"""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

__all__ = [
    "AgentIdentity",
    "AgentLease",
    "AgentLeases",
    "AgentOffer",
    "AgentOffers",
    "InventoryGpu",
    "InventoryReport",
    "MeterAck",
    "MeterConflict",
    "MeterReport",
    "MeterSample",
    "OfferCreate",
    "format_rfc3339",
    "parse_rfc3339",
]


class WireRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Base of every body the agent sends."""


class WireReply(msgspec.Struct, frozen=True, kw_only=True):
    """Base of every body the agent reads; unknown fields are ignored (SPEC §9: servers may add)."""


# ---------------------------------------------------------------------------------------------
# Sent by the agent


class InventoryGpu(WireRequest):
    uuid: str
    model: str
    memory_mb: int
    # Optional additions beyond the fixed §9 shape; omitted when unknown.
    index: int | None = None
    name: str | None = None
    power_limit_mw: int | None = None
    mig: bool | None = None


class InventoryReport(WireRequest):
    """``PUT /v1/agent/inventory``."""

    gpus: list[InventoryGpu]


class MeterSample(WireRequest):
    uuid: str
    ts: str  # RFC 3339 UTC
    util: int  # GPU utilisation, percent 0..100
    mem_used_mb: int
    power_mw: int
    energy_mj: int  # total energy counter of the card, monotonic while the driver stays loaded
    temp_c: int
    healthy: bool


class MeterReport(WireRequest):
    """``POST /v1/agent/meter``: one spooled, sequenced batch."""

    seq: int
    samples: list[MeterSample]


class OfferCreate(WireRequest):
    """``POST /v1/offers`` as published by a host's agent."""

    host_id: str | int
    gpus: int
    floor_price: str
    available_until: str
    available_from: str | None = None
    firm_until: str | None = None
    reclaim_notice_s: int | None = None
    reclaim_rate_per_h: float | None = None
    model: str | None = None  # the market model of the published GPUs (a host may mix models)


# ---------------------------------------------------------------------------------------------
# Read by the agent


class AgentIdentity(WireReply):
    """``GET /v1/agent/me``."""

    host_id: str | int
    name: str | None = None
    fabric: str | None = None


class AgentOffer(WireReply):
    id: str | int
    gpus: int | None = None
    available_until: str | None = None
    available_from: str | None = None
    status: str | None = None  # "live" | "withdrawn" | ...; absent means live

    @property
    def is_live(self) -> bool:
        return self.status in (None, "live")


class AgentOffers(WireReply):
    """``GET /v1/agent/offers``: the host's live offers."""

    items: list[AgentOffer] = []


class AgentLease(WireReply):
    id: str | int
    status: str  # "active" | "ending" | "ended" | "failed" (a str: the server may add statuses)
    gpu_uuids: list[str] = []
    start: str | None = None
    end: str | None = None
    # Set once the lease is under notice (status "ending") or over: when it ends, and why
    # ("reclaimed", "outbid", ...). Read by agents/notices.py.
    end_at: str | None = None
    end_reason: str | None = None


class AgentLeases(WireReply):
    """``GET /v1/agent/leases[?status=&cursor=]``: one page; ``next`` is the cursor of the next."""

    items: list[AgentLease] = []
    next: str | None = None


class MeterAck(WireReply):
    """200/202 answer to ``POST /v1/agent/meter``."""

    accepted: int = 0
    duplicate: bool = False
    # Samples the exchange refused for breaking its meter bounds (the rest were kept); absent from
    # older exchanges and from clean reports.
    refused: int = 0
    refused_reasons: dict[str, int] = {}


class MeterConflict(WireReply):
    """409 answer to ``POST /v1/agent/meter``: the exchange has already stored this sequence."""

    expected_seq: int | None = None


# ---------------------------------------------------------------------------------------------
# Time on the wire


def format_rfc3339(epoch_s: float) -> str:
    """Epoch seconds -> RFC 3339 UTC with microseconds and a ``Z`` suffix."""
    return datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_rfc3339(text: str) -> float:
    """RFC 3339 (``Z`` or an offset; a naive time is taken as UTC) -> epoch seconds."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
