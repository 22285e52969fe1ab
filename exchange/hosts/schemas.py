from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from exchange.core.bounds import SmallCount, whole
from exchange.core.structs import Struct

Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=whole(r"[A-Za-z0-9][A-Za-z0-9._:-]*"))]
GpuModel = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=whole(r"[A-Za-z0-9][A-Za-z0-9.-]*"))]
GpuUuid = Annotated[str, msgspec.Meta(min_length=8, max_length=96, pattern=whole(r"(GPU|MIG)-[0-9A-Za-z-]+"))]


class HostCreate(Struct, frozen=True, kw_only=True):
    name: Name
    fabric: Name = "default"


class HostCreated(Struct, frozen=True, kw_only=True):
    id: int
    name: str
    fabric: str
    agent_token: str


class InventoryGpu(Struct, frozen=True, kw_only=True):
    uuid: GpuUuid
    model: GpuModel
    memory_mb: Annotated[int, msgspec.Meta(gt=0, le=10_000_000)]
    # Optional details an agent may add; stored nowhere yet but accepted so agents can send them.
    name: str | None = None
    index: SmallCount | None = None  # stored in an int column
    power_limit_mw: SmallCount | None = None
    mig: bool | None = None


class Inventory(Struct, frozen=True, kw_only=True):
    gpus: Annotated[list[InventoryGpu], msgspec.Meta(max_length=256)]


class HostGpu(Struct, frozen=True, kw_only=True):
    uuid: str
    model: str
    memory_mb: int
    index: int


class Host(Struct, frozen=True, kw_only=True):
    id: int
    name: str
    fabric: str
    owner_id: int
    created_at: datetime
    last_seen_at: datetime | None
    gpus: list[HostGpu]


class HostList(Struct, frozen=True, kw_only=True):
    items: list[Host]


class AgentIdentity(Struct, frozen=True, kw_only=True):
    host_id: int
    name: str
    fabric: str


class EarningsFigures(Struct, frozen=True, kw_only=True):
    """What leases earned: a host's (HostEarnings), or the sum over an owner's hosts (the CLI's)."""
    leases: int
    billed_gpu_hours: str
    charged: str
    fees: str
    earned: str
    energy_kwh: str


class HostEarnings(EarningsFigures, frozen=True, kw_only=True):
    host_id: int
