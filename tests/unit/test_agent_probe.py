"""GPU probes: model naming, the simulated backend, and NvmlProbe over a stand-in NVML module."""

from __future__ import annotations

import re
import types
from dataclasses import dataclass

import pytest

from agents.probe import (
    KNOWN_MODELS,
    PROBE_BACKENDS,
    NvmlProbe,
    SimulatedProbe,
    make_probe,
    market_model,
    marketed_memory_gb,
    parse_simulate_spec,
    probe_backend_name,
)


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def run_for(probe: SimulatedProbe, clock: FakeClock, seconds: int, step: float = 1.0) -> list:
    samples = []
    for _ in range(int(seconds / step)):
        clock.advance(step)
        samples.append(probe.sample())
    return samples


# ---------------------------------------------------------------------------------------------
# Model names


@pytest.mark.parametrize(
    ("nvml_name", "memory_mb", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 81559, "H100-80GB"),
        ("NVIDIA H100 PCIe", 81559, "H100-80GB"),
        ("NVIDIA H100 NVL", 95830, "H100-94GB"),
        ("NVIDIA A100-SXM4-40GB", 40960, "A100-40GB"),
        ("NVIDIA A100-SXM4-80GB", 81920, "A100-80GB"),
        ("NVIDIA A100 80GB PCIe", 81920, "A100-80GB"),
        ("NVIDIA H200", 143771, "H200-141GB"),
        ("NVIDIA L4", 23034, "L4-24GB"),
        ("NVIDIA L40S", 46068, "L40S-48GB"),
        ("NVIDIA B200", 183359, "B200-180GB"),
        ("NVIDIA GeForce RTX 4090", 24564, "RTX4090-24GB"),
        ("Tesla V100-SXM2-16GB", 16160, "V100-16GB"),
    ],
)
def test_market_model_translates_driver_names(nvml_name: str, memory_mb: int, expected: str) -> None:
    assert market_model(nvml_name, memory_mb) == expected


def test_market_model_round_trips_every_known_model() -> None:
    for model, spec in KNOWN_MODELS.items():
        assert market_model(spec.nvml_name, spec.memory_mb) == model


def test_market_model_refuses_a_name_without_a_model() -> None:
    with pytest.raises(ValueError, match="cannot tell the GPU model"):
        market_model("NVIDIA", 81559)


def test_marketed_memory_falls_back_to_rounding_for_unknown_sizes() -> None:
    assert marketed_memory_gb(1000 * 1024) == 1000
    with pytest.raises(ValueError):
        marketed_memory_gb(0)


# ---------------------------------------------------------------------------------------------
# Simulate spec


@pytest.mark.parametrize(
    ("spec", "expected"),
    [("8xH100-80GB", (8, "H100-80GB")), ("2Xa100-40gb", (2, "A100-40GB")), ("L4-24GB", (1, "L4-24GB")),
     ("4xH200", (4, "H200-141GB")), (" 16 x B200-180GB ", (16, "B200-180GB"))],
)
def test_parse_simulate_spec_accepts_count_and_model(spec: str, expected: tuple[int, str]) -> None:
    assert parse_simulate_spec(spec) == expected


@pytest.mark.parametrize(
    ("spec", "message"),
    [("", "expected COUNTxMODEL"), ("8x", "unknown model '8x'"), ("0xH100-80GB", "count must be"),
     ("65xH100-80GB", "count must be"), ("8xZ999-1GB", "unknown model 'Z999-1GB'"),
     ("8xA100", "unknown model 'A100'")],
)
def test_parse_simulate_spec_explains_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_simulate_spec(spec)


# ---------------------------------------------------------------------------------------------
# Simulated backend


def test_simulated_inventory_follows_the_spec() -> None:
    probe = SimulatedProbe("8xH100-80GB", seed=1, clock=FakeClock(), host="h1")

    inventory = probe.inventory()

    assert [gpu.index for gpu in inventory] == list(range(8))
    assert {gpu.model for gpu in inventory} == {"H100-80GB"}
    assert {gpu.memory_mb for gpu in inventory} == {81559}
    assert {gpu.power_limit_mw for gpu in inventory} == {700_000}
    assert all(re.fullmatch(r"GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", g.uuid) for g in inventory)
    assert len({gpu.uuid for gpu in inventory}) == 8


def test_simulated_uuids_are_stable_per_seed_and_host() -> None:
    def uuids(seed: int, host: str) -> list[str]:
        return [gpu.uuid for gpu in SimulatedProbe("4xH100-80GB", seed=seed, clock=FakeClock(), host=host).inventory()]

    assert uuids(7, "h1") == uuids(7, "h1")
    assert set(uuids(7, "h1")).isdisjoint(uuids(7, "h2"))
    assert set(uuids(7, "h1")).isdisjoint(uuids(8, "h1"))


def test_simulated_readings_are_deterministic() -> None:
    def readings() -> list:
        clock = FakeClock()
        probe = SimulatedProbe("2xH100-80GB", seed=3, clock=clock, host="h1")
        probe.set_busy([probe.inventory()[0].uuid], True)
        return run_for(probe, clock, 20)

    assert readings() == readings()


def test_simulated_idle_gpu_draws_idle_power_at_low_util() -> None:
    clock = FakeClock()
    probe = SimulatedProbe("8xH100-80GB", seed=0, clock=clock, host="h1")

    samples = [s for batch in run_for(probe, clock, 30) for s in batch]

    assert all(60_000 <= s.power_mw <= 80_000 for s in samples)
    assert all(s.util <= 5 for s in samples)
    assert all(s.healthy for s in samples)
    assert all(25 <= s.temp_c <= 45 for s in samples)


def test_simulated_busy_gpu_runs_near_its_power_limit_with_memory_rising() -> None:
    clock = FakeClock()
    probe = SimulatedProbe("2xH100-80GB", seed=0, clock=clock, host="h1")
    busy, idle = (gpu.uuid for gpu in probe.inventory())
    before = {s.uuid: s for s in probe.sample()}

    probe.set_busy([busy], True)
    settled = run_for(probe, clock, 60)[-1]
    after = {s.uuid: s for s in settled}

    assert 600_000 <= after[busy].power_mw <= 700_000
    assert 90 <= after[busy].util <= 100
    assert after[busy].mem_used_mb > 0.5 * 81559 > before[busy].mem_used_mb
    assert after[busy].temp_c > before[busy].temp_c + 20
    assert 60_000 <= after[idle].power_mw <= 80_000


def test_simulated_gpu_returns_to_idle_when_the_lease_ends() -> None:
    clock = FakeClock()
    probe = SimulatedProbe("1xH100-80GB", seed=0, clock=clock, host="h1")
    uuid = probe.inventory()[0].uuid
    probe.set_busy([uuid], True)
    run_for(probe, clock, 30)

    probe.set_busy([uuid], False)
    last = run_for(probe, clock, 30)[-1][0]

    assert 60_000 <= last.power_mw <= 80_000
    assert last.mem_used_mb < 1000


def test_simulated_energy_counter_integrates_power_and_never_decreases() -> None:
    clock = FakeClock()
    probe = SimulatedProbe("1xH100-80GB", seed=5, clock=clock, host="h1")
    uuid = probe.inventory()[0].uuid
    first = probe.sample()[0]
    probe.set_busy([uuid], True)
    samples = [batch[0] for batch in run_for(probe, clock, 100)]
    clock.advance(-50)  # a clock stepped back (NTP) must not run the counter backwards
    samples.append(probe.sample()[0])

    energies = [first.energy_mj] + [s.energy_mj for s in samples]
    assert all(b >= a for a, b in zip(energies, energies[1:], strict=False))
    # 100 s mostly near 630-693 W: between 50 kJ and 70 kJ, in mJ
    assert 50_000_000 <= samples[-2].energy_mj - first.energy_mj <= 70_000_000


def test_simulated_energy_counter_resumes_across_a_restart(tmp_path) -> None:  # noqa: ANN001
    clock = FakeClock()
    state = tmp_path / "sim.json"
    probe = SimulatedProbe("1xH100-80GB", seed=5, clock=clock, host="h1", state_path=state)
    probe.set_busy([probe.inventory()[0].uuid], True)
    last = [batch[0] for batch in run_for(probe, clock, 30)][-1]
    probe.close()
    clock.advance(10)

    restarted = SimulatedProbe("1xH100-80GB", seed=5, clock=clock, host="h1", state_path=state)
    first = restarted.sample()[0]

    # continues from where it was, plus the last power over the 10 s gap
    assert first.energy_mj == pytest.approx(last.energy_mj + 10 * last.power_mw, abs=2)


@pytest.mark.parametrize("kind", ["xid", "ecc"])
def test_injected_fault_makes_only_that_gpu_unhealthy(kind: str) -> None:
    clock = FakeClock()
    probe = SimulatedProbe("2xH100-80GB", seed=0, clock=clock, host="h1")
    faulty, fine = (gpu.uuid for gpu in probe.inventory())

    probe.inject_fault(faulty, kind)
    clock.advance(1)
    health = {s.uuid: s.healthy for s in probe.sample()}

    assert health == {faulty: False, fine: True}
    probe.clear_faults(faulty)
    assert all(s.healthy for s in probe.sample())


def test_inject_fault_refuses_unknown_kinds_and_gpus() -> None:
    probe = SimulatedProbe("1xL4-24GB", seed=0, clock=FakeClock(), host="h1")
    with pytest.raises(ValueError, match="unknown fault kind"):
        probe.inject_fault(probe.inventory()[0].uuid, "meltdown")
    with pytest.raises(ValueError, match="no simulated GPU"):
        probe.inject_fault("GPU-nope", "xid")


def test_make_probe_names_the_backend_by_the_simulate_option() -> None:
    assert probe_backend_name("8xH100-80GB") == "simulated"
    assert probe_backend_name(None) == "nvml"
    assert set(PROBE_BACKENDS) == {"simulated", "nvml"}

    probe = make_probe("3xA100-40GB", seed=2, clock=FakeClock(), host="h1")

    assert isinstance(probe, SimulatedProbe)
    assert [gpu.model for gpu in probe.inventory()] == ["A100-40GB"] * 3


# ---------------------------------------------------------------------------------------------
# NvmlProbe over a stand-in for the pynvml module (the real card is covered by test_agent_nvml)


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801 - pynvml's names
    pass


class NVMLError_Timeout(NVMLError):  # noqa: N801
    pass


class NVMLError_GpuIsLost(NVMLError):  # noqa: N801
    pass


@dataclass
class FakeCard:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-11111111-2222-3333-4444-555555555555"
    total_bytes: int = 81559 * 1024 * 1024
    used_bytes: int = 1024 * 1024 * 1024
    power_mw: int = 250_000
    energy_mj: int | None = 10_000_000
    ecc: int | None = 0
    xid_events: bool = True
    pending_xids: list[int] | None = None
    lost: bool = False


def fake_nvml(cards: list[FakeCard]) -> types.SimpleNamespace:
    calls: dict[str, int] = {"init": 0, "shutdown": 0, "freed": 0}

    def card(handle: int) -> FakeCard:
        if cards[handle].lost:
            raise NVMLError_GpuIsLost("GPU is lost")
        return cards[handle]

    def energy(handle: int) -> int:
        value = card(handle).energy_mj
        if value is None:
            raise NVMLError_NotSupported("Not Supported")
        return value

    def ecc(handle: int, error_type: int, counter: int) -> int:
        value = card(handle).ecc
        if value is None:
            raise NVMLError_NotSupported("Not Supported")
        return value

    def register(handle: int, types_: int, event_set: dict) -> None:
        if not cards[handle].xid_events:
            raise NVMLError_NotSupported("Not Supported")
        event_set["handle"] = handle

    def wait(event_set: dict, timeout_ms: int) -> types.SimpleNamespace:
        pending = cards[event_set["handle"]].pending_xids or []
        if not pending:
            raise NVMLError_Timeout("Timeout")
        return types.SimpleNamespace(eventType=8, eventData=pending.pop(0))

    def count_call(key: str):  # noqa: ANN202
        def call(*_: object) -> None:
            calls[key] += 1
        return call

    return types.SimpleNamespace(
        calls=calls,
        NVMLError=NVMLError, NVMLError_NotSupported=NVMLError_NotSupported,
        NVMLError_Timeout=NVMLError_Timeout, NVMLError_GpuIsLost=NVMLError_GpuIsLost,
        NVML_DEVICE_MIG_ENABLE=1, NVML_MEMORY_ERROR_TYPE_UNCORRECTED=1, NVML_VOLATILE_ECC=0,
        NVML_TEMPERATURE_GPU=0, nvmlEventTypeXidCriticalError=8,
        nvmlInit=count_call("init"), nvmlShutdown=count_call("shutdown"),
        nvmlDeviceGetCount=lambda: len(cards),
        nvmlDeviceGetHandleByIndex=lambda index: index,
        nvmlDeviceGetName=lambda h: card(h).name,
        nvmlDeviceGetUUID=lambda h: card(h).uuid,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=card(h).total_bytes, used=card(h).used_bytes),
        nvmlDeviceGetEnforcedPowerLimit=lambda h: 700_000,
        nvmlDeviceGetPowerManagementLimit=lambda h: 700_000,
        nvmlDeviceGetMigMode=lambda h: [0, 0],
        nvmlDeviceGetUtilizationRates=lambda h: types.SimpleNamespace(gpu=97, memory=40),
        nvmlDeviceGetPowerUsage=lambda h: card(h).power_mw,
        nvmlDeviceGetTotalEnergyConsumption=energy,
        nvmlDeviceGetTemperature=lambda h, sensor: 71,
        nvmlDeviceGetTotalEccErrors=ecc,
        nvmlEventSetCreate=lambda: {},
        nvmlDeviceRegisterEvents=register,
        nvmlEventSetWait_v2=wait,
        nvmlEventSetFree=count_call("freed"),
    )


def test_nvml_probe_reads_inventory_and_samples() -> None:
    nvml = fake_nvml([FakeCard()])
    probe = NvmlProbe(nvml=nvml, clock=FakeClock(100.0))

    [info] = probe.inventory()
    [sample] = probe.sample()

    assert (info.model, info.memory_mb, info.power_limit_mw, info.mig) == ("H100-80GB", 81559, 700_000, False)
    assert (sample.ts, sample.util, sample.mem_used_mb, sample.power_mw, sample.energy_mj, sample.temp_c,
            sample.healthy) == (100.0, 97, 1024, 250_000, 10_000_000, 71, True)
    probe.close()
    probe.close()
    assert nvml.calls == {"init": 1, "shutdown": 1, "freed": 1}


def test_nvml_probe_marks_a_critical_xid_unhealthy_and_ignores_application_xids() -> None:
    card = FakeCard(pending_xids=[13, 43])
    probe = NvmlProbe(nvml=fake_nvml([card]), clock=FakeClock())
    assert probe.sample()[0].healthy

    card.pending_xids = [79]

    assert not probe.sample()[0].healthy
    assert not probe.sample()[0].healthy  # sticky until a reset and restart
    assert probe.health_reasons(card.uuid) == ("critical XID 79",)
    probe.close()


def test_nvml_probe_marks_rising_uncorrected_ecc_unhealthy() -> None:
    card = FakeCard(ecc=2)  # errors from before the agent started are the baseline
    probe = NvmlProbe(nvml=fake_nvml([card]), clock=FakeClock())
    assert probe.sample()[0].healthy

    card.ecc = 3

    assert not probe.sample()[0].healthy
    probe.close()


def test_nvml_probe_copes_without_xid_events_ecc_or_energy_counter() -> None:
    card = FakeCard(xid_events=False, ecc=None, energy_mj=None, power_mw=100_000)
    clock = FakeClock()
    probe = NvmlProbe(nvml=fake_nvml([card]), clock=clock)

    first = probe.sample()[0]
    clock.advance(10)
    second = probe.sample()[0]

    assert first.healthy and second.healthy
    assert second.energy_mj - first.energy_mj == 1_000_000  # 100 W for 10 s, integrated
    probe.close()


def test_nvml_probe_reports_a_lost_gpu_unhealthy_without_raising() -> None:
    card = FakeCard()
    probe = NvmlProbe(nvml=fake_nvml([card]), clock=FakeClock())
    card.lost = True

    [sample] = probe.sample()

    assert not sample.healthy and sample.power_mw == 0
    card.lost = False
    assert not probe.sample()[0].healthy
    probe.close()
