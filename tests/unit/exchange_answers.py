"""Answers in the exchange's own shapes, for agent tests that play the exchange: the agent reads
them with the exchange's structs (through exchange/client), so a test's stand-in must send the
same shapes the server does."""
from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from exchange.hosts.schemas import AgentIdentity, Host, HostGpu
from exchange.leases.schemas import OwnerLease

START = datetime(2026, 1, 1, tzinfo=UTC)


def owner_lease(lease_id: int, status: str, gpu_uuids: list[str], *, end_at: datetime | None = None,
                end_reason: str | None = None) -> OwnerLease:
    """A lease on the agent's host as GET /v1/agent/leases lists it. `status` is a str: tests
    also feed statuses the agent does not know."""
    return OwnerLease(id=lease_id, market="H100-80GB/spot", tier="spot", host_id=1, offer_id=1, gpus=len(gpu_uuids),
                      gpu_uuids=gpu_uuids, price="1.00", start_at=START, planned_end_at=START, end_at=end_at,
                      status=status, end_reason=end_reason, metered_gpu_hours="0", billed_gpu_hours="0",  # type: ignore[arg-type]
                      charged="0.00", fees="0.00", energy_kwh="0", settled_at=None)


def owner_lease_json(lease_id: int, status: str, gpu_uuids: list[str]) -> dict[str, Any]:
    return msgspec.to_builtins(owner_lease(lease_id, status, gpu_uuids))


def identity_json(host_id: int = 1) -> dict[str, Any]:
    return msgspec.to_builtins(AgentIdentity(host_id=host_id, name="h1", fabric="pod-a"))


def host_json(gpus: list[dict[str, Any]], host_id: int = 1) -> dict[str, Any]:
    """The answer to PUT /v1/agent/inventory: the host with the GPUs just reported."""
    return msgspec.to_builtins(Host(id=host_id, name="h1", fabric="pod-a", owner_id=1, created_at=START,
                                    last_seen_at=START,
                                    gpus=[HostGpu(uuid=g["uuid"], model=g["model"], memory_mb=g["memory_mb"],
                                                  index=i) for i, g in enumerate(gpus)]))


def offer_json(offer_id: int, body: dict[str, Any], available_from: str) -> dict[str, Any]:
    """The answer to POST /v1/offers for an accepted `body`: its fields, the server's defaults and
    the start the server fixed."""
    return {"id": offer_id, "host_id": body["host_id"], "model": body.get("model") or "H100-80GB",
            "gpus": body["gpus"], "floor_price": body["floor_price"], "available_from": available_from,
            "available_until": body["available_until"], "firm_until": body.get("firm_until"),
            "reclaim_notice_s": body.get("reclaim_notice_s", 120),
            "reclaim_rate_per_h": body.get("reclaim_rate_per_h", 0.0), "status": "live",
            "created_at": available_from}


def error_json(code: str, message: str, **extra: Any) -> dict[str, Any]:
    """The error shape (exchange/core/errors.py), with machine-readable hints beside it."""
    return {"error": {"code": code, "message": message}, **extra}
