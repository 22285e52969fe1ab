"""GPU discovery and sampling: the real NVML backend and a deterministic simulated one.

Both implement :class:`GpuProbe`. The agent picks one with :func:`make_probe` (``--simulate``
names the simulated backend; otherwise NVML). ``nvidia-ml-py`` is imported only when an
:class:`NvmlProbe` is built, so this module imports on machines without a driver or a GPU.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import math
import os
import random
import re
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import msgspec

__all__ = [
    "CRITICAL_XIDS",
    "KNOWN_MODELS",
    "PROBE_BACKENDS",
    "SIMULATED_FAULT_KINDS",
    "Clock",
    "GpuInfo",
    "GpuProbe",
    "GpuSample",
    "ModelSpec",
    "NvmlProbe",
    "SimulatedCardState",
    "SimulatedProbe",
    "make_probe",
    "market_model",
    "marketed_memory_gb",
    "parse_simulate_spec",
    "probe_backend_name",
]

log = logging.getLogger("gpux.agent.probe")

Clock = Callable[[], float]
"""Returns the current time as epoch seconds."""

_MIB = 1024 * 1024


class GpuInfo(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One physical GPU as discovered at start-up."""

    index: int
    uuid: str
    name: str  # the driver's product name, e.g. "NVIDIA H100 80GB HBM3"
    model: str  # the market's model name, e.g. "H100-80GB"
    memory_mb: int  # MiB, as NVML reports it
    power_limit_mw: int
    mig: bool | None = None  # None: the card has no MIG support


class GpuSample(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One reading of one GPU; ``ts`` in epoch seconds (the wire form is RFC 3339)."""

    uuid: str
    ts: float
    util: int
    mem_used_mb: int
    power_mw: int
    energy_mj: int
    temp_c: int
    healthy: bool
    last_xid: int = 0  # the last XID the card raised (0: none); not metered, shown on the agent's metrics


class GpuProbe(Protocol):
    """What the agent needs from a GPU backend."""

    def inventory(self) -> list[GpuInfo]: ...

    def sample(self) -> list[GpuSample]: ...

    def set_busy(self, uuids: Iterable[str], busy: bool) -> None:
        """Tell the backend which GPUs carry a lease (the simulated one follows it; NVML ignores it)."""
        ...

    def close(self) -> None: ...


# ---------------------------------------------------------------------------------------------
# Models


class ModelSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A GPU model the simulated backend can impersonate, with the figures its readings follow."""

    model: str
    nvml_name: str
    memory_mb: int
    power_limit_mw: int
    idle_power_mw: tuple[int, int]  # range the idle draw of one card is drawn from


KNOWN_MODELS: Mapping[str, ModelSpec] = {
    spec.model: spec
    for spec in (
        ModelSpec(model="H100-80GB", nvml_name="NVIDIA H100 80GB HBM3", memory_mb=81559,
                  power_limit_mw=700_000, idle_power_mw=(62_000, 78_000)),
        ModelSpec(model="H200-141GB", nvml_name="NVIDIA H200", memory_mb=143771,
                  power_limit_mw=700_000, idle_power_mw=(66_000, 82_000)),
        ModelSpec(model="B200-180GB", nvml_name="NVIDIA B200", memory_mb=183359,
                  power_limit_mw=1_000_000, idle_power_mw=(120_000, 150_000)),
        ModelSpec(model="A100-80GB", nvml_name="NVIDIA A100-SXM4-80GB", memory_mb=81920,
                  power_limit_mw=400_000, idle_power_mw=(50_000, 62_000)),
        ModelSpec(model="A100-40GB", nvml_name="NVIDIA A100-SXM4-40GB", memory_mb=40960,
                  power_limit_mw=400_000, idle_power_mw=(45_000, 58_000)),
        ModelSpec(model="L40S-48GB", nvml_name="NVIDIA L40S", memory_mb=46068,
                  power_limit_mw=350_000, idle_power_mw=(30_000, 38_000)),
        ModelSpec(model="A10-24GB", nvml_name="NVIDIA A10", memory_mb=23028,
                  power_limit_mw=150_000, idle_power_mw=(16_000, 22_000)),
        ModelSpec(model="L4-24GB", nvml_name="NVIDIA L4", memory_mb=23034,
                  power_limit_mw=72_000, idle_power_mw=(12_000, 17_000)),
    )
}

# Words in a driver product name that say nothing about the model family.
_VENDOR_WORDS = frozenset({"NVIDIA", "GEFORCE", "TESLA", "QUADRO"})
# Form factor, memory technology and marketing suffixes: the same market model either way.
_FORM_FACTOR = re.compile(r"^(SXM\d*|PCIE|NVL|HBM\d*E?|GDDR\d*X?|GENERATION)$")
_MEMORY_IN_NAME = re.compile(r"^(\d+)GB$")
# Memory sizes GPUs are sold under; NVML's MiB total is a little below (or oddly near) these.
_MARKETED_GB = (8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 94, 96, 141, 144, 180, 192, 288)


def marketed_memory_gb(memory_mb: int) -> int:
    """The marketed size of a card's memory from NVML's total (MiB): 81559 -> 80, 143771 -> 141."""
    if memory_mb <= 0:
        raise ValueError(f"memory_mb must be positive, got {memory_mb}")
    gib = memory_mb / 1024
    nearest = min(_MARKETED_GB, key=lambda gb: abs(math.log(gb / gib)))
    # Far from every known size (a card from the future): say what it has rather than guess.
    return nearest if abs(math.log(nearest / gib)) < 0.1 else round(gib)


def market_model(nvml_name: str, memory_mb: int) -> str:
    """The market's model name for a card, e.g. ("NVIDIA H100 80GB HBM3", 81559) -> "H100-80GB".

    The family is the product name without vendor, form-factor and memory words; the memory is
    taken from the name where it says it ("A100-SXM4-40GB"), otherwise from the card's total.
    """
    family: list[str] = []
    gb_in_name: int | None = None
    for token in re.split(r"[\s\-_]+", nvml_name.strip().upper()):
        if not token or token in _VENDOR_WORDS or _FORM_FACTOR.match(token):
            continue
        if memory := _MEMORY_IN_NAME.match(token):
            gb_in_name = int(memory[1])
            continue
        family.append(token)
    if not family:
        raise ValueError(f"cannot tell the GPU model from the name {nvml_name!r}")
    gb = gb_in_name if gb_in_name is not None else marketed_memory_gb(memory_mb)
    return f"{''.join(family)}-{gb}GB"


_SIMULATE_SPEC = re.compile(r"^\s*(?:(\d+)\s*[xX]\s*)?([A-Za-z0-9][A-Za-z0-9.\-]*)\s*$")
MAX_SIMULATED_GPUS = 64


def parse_simulate_spec(spec: str) -> tuple[int, str]:
    """``"8xH100-80GB"`` -> ``(8, "H100-80GB")``. A bare model means one GPU; a bare family
    (``"8xH100"``) is accepted where exactly one known model has it."""
    match = _SIMULATE_SPEC.match(spec)
    if match is None:
        raise ValueError(f"bad simulate spec {spec!r}: expected COUNTxMODEL, e.g. 8xH100-80GB")
    count = int(match[1]) if match[1] is not None else 1
    if not 1 <= count <= MAX_SIMULATED_GPUS:
        raise ValueError(f"bad simulate spec {spec!r}: GPU count must be 1..{MAX_SIMULATED_GPUS}, got {count}")
    wanted = match[2].upper()
    if wanted in KNOWN_MODELS:
        return count, wanted
    same_family = [model for model in KNOWN_MODELS if model.startswith(wanted + "-")]
    if len(same_family) == 1:
        return count, same_family[0]
    known = ", ".join(sorted(KNOWN_MODELS))
    raise ValueError(f"bad simulate spec {spec!r}: unknown model {match[2]!r} (known: {known})")


# ---------------------------------------------------------------------------------------------
# Simulated backend

SIMULATED_FAULT_KINDS = frozenset({"xid", "ecc"})
SIMULATED_XID = 79  # what an injected "xid" fault raises: "GPU has fallen off the bus", a critical one

# Time constants of the simulated card's physics, in seconds.
_POWER_TAU_S = 1.5
_TEMP_TAU_S = 15.0
_MEM_RISE_TAU_S = 3.0
_MEM_FALL_TAU_S = 0.5
_AMBIENT_C = (27.0, 31.0)
_TEMP_RISE_AT_LIMIT_C = 55.0  # a card at its power limit sits ~55 °C over the inlet


def _approach(current: float, target: float, dt: float, tau: float) -> float:
    """First-order lag: where a quantity moving towards ``target`` is after ``dt`` seconds."""
    return current + (target - current) * (1.0 - math.exp(-dt / tau))


def simulated_uuid(host: str, seed: int, index: int) -> str:
    """A stable, uuid-shaped GPU id for one simulated card of one host."""
    digest = hashlib.sha256(f"gpux-sim:{host}:{seed}:{index}".encode()).hexdigest()
    return f"GPU-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


class _SimulatedGpu:
    """Mutable state of one simulated card (internal; never crosses a boundary)."""

    def __init__(self, info: GpuInfo, spec: ModelSpec, rng: random.Random) -> None:
        self.info = info
        self.rng = rng
        self.idle_power_mw = rng.uniform(*spec.idle_power_mw)
        self.ambient_c = rng.uniform(*_AMBIENT_C)
        self.idle_mem_mb = rng.uniform(2.0, 600.0)
        # A card has been powered for a while before the agent starts: start the counter there.
        self.energy_mj = rng.uniform(1e8, 5e9)
        self.power_mw = self.idle_power_mw
        self.temp_c = self._equilibrium_temp(self.power_mw)
        self.mem_used_mb = self.idle_mem_mb
        self.busy = False
        self.busy_mem_mb = self.idle_mem_mb
        self.faults: set[str] = set()
        self.last_xid = 0
        self.last_ts: float | None = None

    def _equilibrium_temp(self, power_mw: float) -> float:
        return self.ambient_c + _TEMP_RISE_AT_LIMIT_C * power_mw / self.info.power_limit_mw

    def set_busy(self, busy: bool) -> None:
        if busy and not self.busy:
            # A new workload: it settles at its own share of the card's memory.
            self.busy_mem_mb = self.info.memory_mb * self.rng.uniform(0.6, 0.95)
        self.busy = busy

    def step(self, now: float) -> GpuSample:
        # A clock that steps back (NTP) must not run the energy counter backwards.
        dt = 0.0 if self.last_ts is None else max(0.0, now - self.last_ts)
        self.last_ts = now if self.last_ts is None else max(self.last_ts, now)
        limit = self.info.power_limit_mw
        if self.busy:
            target_power = limit * self.rng.uniform(0.90, 0.99)
            util = self.rng.randint(90, 100)
            mem_target, mem_tau = self.busy_mem_mb, _MEM_RISE_TAU_S
        else:
            target_power = self.idle_power_mw * self.rng.uniform(0.98, 1.02)
            util = self.rng.randint(0, 3)
            mem_target, mem_tau = self.idle_mem_mb, _MEM_FALL_TAU_S
        new_power = _approach(self.power_mw, target_power, dt, _POWER_TAU_S) if dt else self.power_mw
        self.energy_mj += (self.power_mw + new_power) / 2.0 * dt  # trapezoid: mW * s = mJ
        self.power_mw = new_power
        self.temp_c = _approach(self.temp_c, self._equilibrium_temp(new_power), dt, _TEMP_TAU_S)
        self.mem_used_mb = _approach(self.mem_used_mb, mem_target, dt, mem_tau)
        return GpuSample(
            uuid=self.info.uuid,
            ts=now,
            util=util,
            mem_used_mb=int(self.mem_used_mb),
            power_mw=int(self.power_mw),
            energy_mj=int(self.energy_mj),
            temp_c=round(self.temp_c),
            healthy=not self.faults,
            last_xid=self.last_xid,
        )


class SimulatedCardState(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What a simulated card carries across an agent restart: its energy counter."""

    energy_mj: float
    power_mw: float
    ts: float


_card_states_decoder = msgspec.json.Decoder(dict[str, SimulatedCardState])
_card_states_encoder = msgspec.json.Encoder()


class SimulatedProbe:
    """Deterministic, realistic readings of ``spec`` (e.g. ``"8xH100-80GB"``) that follow lease
    activity (:meth:`set_busy`) and injected faults (:meth:`inject_fault`).

    The same ``seed``, ``host`` and sequence of clock readings give the same samples; UUIDs depend
    only on ``host``, ``seed`` and the card's index, so a restarted agent reports the same GPUs.
    With ``state_path`` the energy counters are saved at every sample and resumed at start (plus
    the last power over the gap), so that, as with a real card whose driver stays loaded, an agent
    restart never runs a card's counter backwards.
    """

    def __init__(self, spec: str = "8xH100-80GB", *, seed: int = 0, clock: Clock = time.time,
                 host: str | None = None, state_path: str | os.PathLike[str] | None = None) -> None:
        count, model = parse_simulate_spec(spec)
        model_spec = KNOWN_MODELS[model]
        self._clock = clock
        host_name = host if host is not None else socket.gethostname()
        self._gpus: dict[str, _SimulatedGpu] = {}
        for index in range(count):
            info = GpuInfo(
                index=index,
                uuid=simulated_uuid(host_name, seed, index),
                name=model_spec.nvml_name,
                model=model_spec.model,
                memory_mb=model_spec.memory_mb,
                power_limit_mw=model_spec.power_limit_mw,
                mig=False,
            )
            rng = random.Random(f"gpux-sim:{host_name}:{seed}:{index}")
            self._gpus[info.uuid] = _SimulatedGpu(info, model_spec, rng)
        self._state_path = Path(state_path) if state_path is not None else None
        self._resume_counters()

    def inventory(self) -> list[GpuInfo]:
        return [gpu.info for gpu in self._gpus.values()]

    def sample(self) -> list[GpuSample]:
        now = self._clock()
        samples = [gpu.step(now) for gpu in self._gpus.values()]
        self._save_counters(now)
        return samples

    def _resume_counters(self) -> None:
        if self._state_path is None:
            return
        try:
            saved = _card_states_decoder.decode(self._state_path.read_bytes())
        except FileNotFoundError:
            return
        except (OSError, msgspec.DecodeError) as error:
            log.warning("simulated GPU state %s unreadable (%s); counters start afresh", self._state_path, error)
            return
        now = self._clock()
        for uuid, state in saved.items():
            if (gpu := self._gpus.get(uuid)) is not None:
                gpu.energy_mj = state.energy_mj + state.power_mw * max(0.0, now - state.ts)

    def _save_counters(self, now: float) -> None:
        if self._state_path is None:
            return
        states = {uuid: SimulatedCardState(energy_mj=gpu.energy_mj, power_mw=gpu.power_mw, ts=gpu.last_ts or now)
                  for uuid, gpu in self._gpus.items()}
        tmp = self._state_path.with_name(f".{self._state_path.name}.tmp")
        try:
            # Atomic but not fsynced: losing the last second to a power cut costs nothing real.
            tmp.write_bytes(_card_states_encoder.encode(states))
            os.replace(tmp, self._state_path)
        except OSError as error:
            log.warning("could not save simulated GPU state: %s", error)

    def set_busy(self, uuids: Iterable[str], busy: bool) -> None:
        for uuid in uuids:
            gpu = self._gpus.get(uuid)
            if gpu is None:
                log.warning("set_busy: no simulated GPU %s on this host", uuid)
                continue
            gpu.set_busy(busy)

    def inject_fault(self, uuid: str, kind: str) -> None:
        """Make a GPU unhealthy as an XID critical error or an uncorrected ECC error would."""
        if kind not in SIMULATED_FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r} (known: {', '.join(sorted(SIMULATED_FAULT_KINDS))})")
        gpu = self._gpu(uuid)
        gpu.faults.add(kind)
        if kind == "xid":
            gpu.last_xid = SIMULATED_XID

    def clear_faults(self, uuid: str) -> None:
        """As a GPU reset would."""
        gpu = self._gpu(uuid)
        gpu.faults.clear()
        gpu.last_xid = 0

    def close(self) -> None:
        """Nothing to release."""

    def _gpu(self, uuid: str) -> _SimulatedGpu:
        try:
            return self._gpus[uuid]
        except KeyError:
            raise ValueError(f"no simulated GPU {uuid!r} on this host") from None


# ---------------------------------------------------------------------------------------------
# NVML backend

# XIDs that say the card itself (not the tenant's program) is in trouble and needs a reset or a
# repair: ECC double-bit/uncontained errors, row-remap failure, micro-controller halts, NVLink
# errors, GSP errors, fallen off the bus. Application faults (13, 31, 43, 45, ...) are not here:
# a tenant's bad kernel must not take the owner's card off the market.
CRITICAL_XIDS = frozenset({48, 61, 62, 63, 64, 74, 79, 92, 94, 95, 119, 120, 140})
_MAX_EVENTS_PER_SAMPLE = 256


class _NvmlGpu:
    """Handle and health bookkeeping of one NVML device (internal)."""

    def __init__(self, info: GpuInfo, handle: Any) -> None:
        self.info = info
        self.handle = handle
        self.event_set: Any = None
        self.ecc_baseline: int | None = None
        self.unhealthy_reasons: list[str] = []
        self.energy_supported = True
        self.integrated_energy_mj = 0.0
        self.last_power: tuple[float, float] | None = None  # (ts, power_mw) for the fallback
        self.last_xid = 0

    def mark_unhealthy(self, reason: str) -> None:
        if reason not in self.unhealthy_reasons:
            log.warning("GPU %s (%s) is unhealthy: %s", self.info.index, self.info.uuid, reason)
            self.unhealthy_reasons.append(reason)


class NvmlProbe:
    """Reads real GPUs through NVML.

    ``nvml`` is the ``pynvml`` module (imported here, lazily, when not given); tests can pass an
    object with the same functions. Health is sticky: once a card reports a critical XID, a rising
    uncorrected-ECC count or is lost, it stays unhealthy until the agent restarts (after a reset).
    """

    def __init__(self, *, clock: Clock = time.time, nvml: Any = None,
                 critical_xids: frozenset[int] = CRITICAL_XIDS) -> None:
        self._nvml = nvml if nvml is not None else importlib.import_module("pynvml")
        self._clock = clock
        self._critical_xids = critical_xids
        self._closed = False
        self._nvml.nvmlInit()
        try:
            self._gpus = [self._open(index) for index in range(self._nvml.nvmlDeviceGetCount())]
        except BaseException:
            self.close()
            raise

    # -- discovery

    def _open(self, index: int) -> _NvmlGpu:
        nvml = self._nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(index)
        name = nvml.nvmlDeviceGetName(handle)
        memory_mb = nvml.nvmlDeviceGetMemoryInfo(handle).total // _MIB
        power_limit = self._optional(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
        if power_limit is None:
            power_limit = self._optional(nvml.nvmlDeviceGetPowerManagementLimit, handle)
        mig_mode = self._optional(nvml.nvmlDeviceGetMigMode, handle)
        info = GpuInfo(
            index=index,
            uuid=nvml.nvmlDeviceGetUUID(handle),
            name=name,
            model=market_model(name, memory_mb),
            memory_mb=memory_mb,
            power_limit_mw=int(power_limit or 0),
            mig=None if mig_mode is None else mig_mode[0] == nvml.NVML_DEVICE_MIG_ENABLE,
        )
        gpu = _NvmlGpu(info, handle)
        gpu.event_set = self._register_xid_events(gpu)
        gpu.ecc_baseline = self._uncorrected_ecc(gpu)
        return gpu

    def _register_xid_events(self, gpu: _NvmlGpu) -> Any:
        nvml = self._nvml
        event_set = nvml.nvmlEventSetCreate()
        try:
            nvml.nvmlDeviceRegisterEvents(gpu.handle, nvml.nvmlEventTypeXidCriticalError, event_set)
        except nvml.NVMLError as error:
            nvml.nvmlEventSetFree(event_set)
            # Not supported in many VMs and on consumer cards: health then rests on ECC alone.
            log.info("GPU %s: no XID events (%s); health from ECC counters only", gpu.info.index, error)
            return None
        return event_set

    def _uncorrected_ecc(self, gpu: _NvmlGpu) -> int | None:
        nvml = self._nvml
        return self._optional(nvml.nvmlDeviceGetTotalEccErrors, gpu.handle,
                              nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)

    def _optional(self, read: Callable[..., Any], *args: Any) -> Any:
        """A reading the card may not support: None instead of NVMLError_NotSupported."""
        try:
            return read(*args)
        except self._nvml.NVMLError_NotSupported:
            return None

    # -- GpuProbe

    def inventory(self) -> list[GpuInfo]:
        return [gpu.info for gpu in self._gpus]

    def sample(self) -> list[GpuSample]:
        now = self._clock()
        return [self._sample(gpu, now) for gpu in self._gpus]

    def set_busy(self, uuids: Iterable[str], busy: bool) -> None:
        """Nothing to do: a real card's readings follow the tenant's real workload."""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for gpu in getattr(self, "_gpus", ()):
            if gpu.event_set is not None:
                try:
                    self._nvml.nvmlEventSetFree(gpu.event_set)
                except self._nvml.NVMLError as error:
                    log.debug("freeing the event set of GPU %s: %s", gpu.info.index, error)
                gpu.event_set = None
        self._nvml.nvmlShutdown()

    def health_reasons(self, uuid: str) -> tuple[str, ...]:
        """Why a GPU is unhealthy (empty when it is healthy)."""
        return next((tuple(g.unhealthy_reasons) for g in self._gpus if g.info.uuid == uuid), ())

    # -- sampling

    def _sample(self, gpu: _NvmlGpu, now: float) -> GpuSample:
        nvml = self._nvml
        try:
            self._drain_xid_events(gpu)
            self._check_ecc(gpu)
            util = self._optional(nvml.nvmlDeviceGetUtilizationRates, gpu.handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(gpu.handle)
            power_mw = self._optional(nvml.nvmlDeviceGetPowerUsage, gpu.handle) or 0
            temp_c = self._optional(nvml.nvmlDeviceGetTemperature, gpu.handle, nvml.NVML_TEMPERATURE_GPU)
            energy_mj = self._energy(gpu, now, power_mw)
        except nvml.NVMLError as error:
            # Never crash metering on a read: report the card as down for this sample. A lost GPU
            # (fallen off the bus) stays down; other errors may be transient.
            if isinstance(error, nvml.NVMLError_GpuIsLost):
                gpu.mark_unhealthy("GPU is lost (fallen off the bus)")
            else:
                log.warning("GPU %s: NVML read failed: %s", gpu.info.index, error)
            return GpuSample(uuid=gpu.info.uuid, ts=now, util=0, mem_used_mb=0, power_mw=0,
                             energy_mj=int(gpu.integrated_energy_mj), temp_c=0, healthy=False,
                             last_xid=gpu.last_xid)
        return GpuSample(
            uuid=gpu.info.uuid,
            ts=now,
            util=int(util.gpu) if util is not None else 0,
            mem_used_mb=int(memory.used // _MIB),
            power_mw=int(power_mw),
            energy_mj=int(energy_mj),
            temp_c=int(temp_c or 0),
            healthy=not gpu.unhealthy_reasons,
            last_xid=gpu.last_xid,
        )

    def _energy(self, gpu: _NvmlGpu, now: float, power_mw: float) -> float:
        if gpu.energy_supported:
            try:
                energy = self._nvml.nvmlDeviceGetTotalEnergyConsumption(gpu.handle)
            except self._nvml.NVMLError_NotSupported:
                gpu.energy_supported = False  # pre-Volta: integrate power ourselves from here on
            else:
                gpu.integrated_energy_mj = float(energy)
                return energy
        if gpu.last_power is not None:
            last_ts, last_power = gpu.last_power
            gpu.integrated_energy_mj += (last_power + power_mw) / 2.0 * max(0.0, now - last_ts)
        gpu.last_power = (now, power_mw)
        return gpu.integrated_energy_mj

    def _drain_xid_events(self, gpu: _NvmlGpu) -> None:
        nvml = self._nvml
        for _ in range(_MAX_EVENTS_PER_SAMPLE):
            if gpu.event_set is None:
                return
            try:
                event = nvml.nvmlEventSetWait_v2(gpu.event_set, 0)
            except nvml.NVMLError_Timeout:
                return  # no more events
            except nvml.NVMLError as error:
                log.warning("GPU %s: XID event polling stopped: %s", gpu.info.index, error)
                nvml.nvmlEventSetFree(gpu.event_set)
                gpu.event_set = None
                return
            xid = int(event.eventData)
            gpu.last_xid = xid  # every XID, critical or not, as DCGM_FI_DEV_XID_ERRORS shows it
            if xid in self._critical_xids:
                gpu.mark_unhealthy(f"critical XID {xid}")
            else:
                log.info("GPU %s: XID %s (not critical to the card)", gpu.info.index, xid)

    def _check_ecc(self, gpu: _NvmlGpu) -> None:
        if gpu.ecc_baseline is None:
            return
        count = self._uncorrected_ecc(gpu)
        if count is not None and count > gpu.ecc_baseline:
            gpu.mark_unhealthy(f"uncorrected volatile ECC errors rose from {gpu.ecc_baseline} to {count}")


# ---------------------------------------------------------------------------------------------
# Backend choice


class ProbeFactory(Protocol):
    def __call__(self, simulate: str | None, *, seed: int, clock: Clock, host: str | None,
                 state_dir: Path | None) -> GpuProbe: ...


def _nvml_backend(simulate: str | None, *, seed: int, clock: Clock, host: str | None,
                  state_dir: Path | None) -> GpuProbe:
    return NvmlProbe(clock=clock)


def _simulated_backend(simulate: str | None, *, seed: int, clock: Clock, host: str | None,
                       state_dir: Path | None) -> GpuProbe:
    assert simulate is not None
    state_path = state_dir / "simulated-gpus.json" if state_dir is not None else None
    return SimulatedProbe(simulate, seed=seed, clock=clock, host=host, state_path=state_path)


PROBE_BACKENDS: Mapping[str, ProbeFactory] = {"nvml": _nvml_backend, "simulated": _simulated_backend}


def probe_backend_name(simulate: str | None) -> str:
    """``--simulate SPEC`` selects the simulated backend; no spec means real GPUs."""
    return "simulated" if simulate else "nvml"


def make_probe(simulate: str | None = None, *, seed: int = 0, clock: Clock = time.time,
               host: str | None = None, state_dir: str | os.PathLike[str] | None = None) -> GpuProbe:
    """The probe the agent meters with: NVML, or the simulated cards ``simulate`` names.
    ``state_dir`` is where a backend may keep state across restarts (the agent's data dir)."""
    backend = PROBE_BACKENDS[probe_backend_name(simulate)]
    return backend(simulate, seed=seed, clock=clock, host=host,
                   state_dir=Path(state_dir) if state_dir is not None else None)
