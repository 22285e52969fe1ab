from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from exchange.core.bounds import BigCount, Seq, SmallCount
from exchange.core.structs import Struct
from exchange.hosts.schemas import GpuUuid

MAX_SAMPLES_PER_REPORT = 20_000


class MeterSample(Struct, frozen=True, kw_only=True):
    uuid: GpuUuid
    ts: datetime
    util: Annotated[int, msgspec.Meta(ge=0, le=100)]
    mem_used_mb: SmallCount  # an int column
    power_mw: BigCount
    energy_mj: BigCount
    temp_c: Annotated[int, msgspec.Meta(ge=-100, le=200)]
    healthy: bool


class MeterReport(Struct, frozen=True, kw_only=True):
    seq: Seq
    samples: Annotated[list[MeterSample], msgspec.Meta(max_length=MAX_SAMPLES_PER_REPORT)]


class MeterAck(Struct, frozen=True, kw_only=True):
    seq: int
    accepted: int
    duplicate: bool
