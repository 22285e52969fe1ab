from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec

from exchange.core.bounds import Seq
from exchange.core.structs import Struct
from exchange.hosts.schemas import GpuUuid

MAX_SAMPLES_PER_REPORT = 20_000


# Readings are bounded here only to 64 bits: whether a reading is physical (exchange.metering.bounds)
# is decided per sample at ingest, so that one bad reading refuses that sample, not its whole report.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]


class MeterSample(Struct, frozen=True, kw_only=True):
    uuid: GpuUuid
    ts: datetime
    util: Int64
    mem_used_mb: Int64
    power_mw: Int64
    energy_mj: Int64
    temp_c: Int64
    healthy: bool


class MeterReport(Struct, frozen=True, kw_only=True):
    seq: Seq
    samples: Annotated[list[MeterSample], msgspec.Meta(max_length=MAX_SAMPLES_PER_REPORT)]


class MeterAck(Struct, frozen=True, kw_only=True, omit_defaults=True):
    seq: int
    accepted: int
    duplicate: bool
    # Samples of this report refused for breaking the meter bounds, by reason (the others are
    # kept). Omitted when none (the response of a clean report keeps its old shape); agents ignore
    # fields they do not know (SPEC §9).
    refused: int = 0
    refused_reasons: dict[str, int] = {}
