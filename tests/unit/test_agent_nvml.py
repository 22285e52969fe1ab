"""NvmlProbe on a real card (skipped where NVML cannot initialise: no driver or no GPU)."""

from __future__ import annotations

import time

import pytest

from agents.probe import NvmlProbe

pytestmark = pytest.mark.gpu


@pytest.fixture
def probe():  # noqa: ANN201
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as error:
        pytest.skip(f"NVML unavailable: {error}")
    try:
        if pynvml.nvmlDeviceGetCount() == 0:
            pytest.skip("no NVIDIA GPU")
    finally:
        pynvml.nvmlShutdown()
    nvml_probe = NvmlProbe()
    yield nvml_probe
    nvml_probe.close()


def test_nvml_probe_reads_a_real_cards_inventory(probe: NvmlProbe) -> None:
    inventory = probe.inventory()

    assert inventory
    for gpu in inventory:
        assert gpu.uuid.startswith(("GPU-", "MIG-"))
        assert gpu.memory_mb > 1000
        assert gpu.model.endswith("GB") and "-" in gpu.model
        assert gpu.power_limit_mw > 0


def test_nvml_probe_samples_utilisation_power_and_a_rising_energy_counter(probe: NvmlProbe) -> None:
    first = {s.uuid: s for s in probe.sample()}
    time.sleep(1.5)
    second = {s.uuid: s for s in probe.sample()}

    assert first.keys() == second.keys() == {gpu.uuid for gpu in probe.inventory()}
    for uuid, later in second.items():
        earlier = first[uuid]
        assert 0 <= later.util <= 100
        assert later.power_mw > 0
        assert 0 <= later.mem_used_mb <= max(g.memory_mb for g in probe.inventory())
        assert 0 < later.temp_c < 120
        assert later.energy_mj > earlier.energy_mj  # a powered card always draws something
        assert later.healthy
