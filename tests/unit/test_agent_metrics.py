"""The agent's metrics text (dcgm-exporter names, labels, units; the last XID) and its HTTP server,
scraped over real HTTP on a free port."""
from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agents.metrics import AgentCounters, MetricsServer, render_metrics
from agents.probe import SIMULATED_XID, NvmlProbe, SimulatedProbe
from tests.unit.test_agent_probe import FakeCard, FakeClock, fake_nvml

COUNTERS = AgentCounters(spool_reports=3, spool_bytes=4096, spool_dropped_reports=0, reports_sent=7,
                         reports_refused=1, leases=2, samples_taken=11)


def values(text: str, name: str) -> dict[str, str]:
    """{gpu index or "": value} of one series in the text."""
    found = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels, value = line[len(name) + 1:].rsplit("} ", 1)
            gpu = next((part.split("=")[1].strip('"') for part in labels.split(",") if part.startswith("gpu=")), "")
            found[gpu] = value
    return found


def test_render_uses_dcgm_units_labels_and_the_last_xid() -> None:
    probe = SimulatedProbe("2xH100-80GB", host="h1", clock=FakeClock(1000.0))
    inventory = probe.inventory()
    probe.inject_fault(inventory[1].uuid, "xid")
    samples = probe.sample()

    text = render_metrics("h1", inventory, samples, COUNTERS)

    by_gpu = {str(gpu.index): sample for gpu, sample in zip(inventory, samples, strict=True)}
    power = values(text, "DCGM_FI_DEV_POWER_USAGE")
    assert {gpu: float(w) for gpu, w in power.items()} == {gpu: s.power_mw / 1000 for gpu, s in by_gpu.items()}
    assert values(text, "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION") == {g: str(s.energy_mj) for g, s in by_gpu.items()}
    assert values(text, "DCGM_FI_DEV_FB_USED") == {g: str(s.mem_used_mb) for g, s in by_gpu.items()}
    assert values(text, "DCGM_FI_DEV_FB_FREE") == {g: str(81559 - s.mem_used_mb) for g, s in by_gpu.items()}
    assert values(text, "DCGM_FI_DEV_GPU_TEMP") == {g: str(s.temp_c) for g, s in by_gpu.items()}
    assert values(text, "DCGM_FI_DEV_XID_ERRORS") == {"0": "0", "1": str(SIMULATED_XID)}
    assert (f'DCGM_FI_DEV_GPU_UTIL{{gpu="0",UUID="{inventory[0].uuid}",device="nvidia0",'
            f'modelName="NVIDIA H100 80GB HBM3",Hostname="h1"}} {samples[0].util}') in text.splitlines()
    assert values(text, "gpux_agent_spool_reports") == {"": "3"}
    assert values(text, "gpux_agent_meter_reports_sent_total") == {"": "7"}
    assert values(text, "gpux_agent_meter_reports_refused_total") == {"": "1"}
    assert values(text, "gpux_agent_leases") == {"": "2"}
    # Valid exposition text by Prometheus' own parser (on the wire the energy counter keeps
    # dcgm-exporter's bare name, checked above; the parser's object model adds "_total" itself).
    families = {family.name: family for family in text_string_to_metric_families(text)}
    assert families["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"].type == "counter"
    assert all(len(families[name].samples) == 2 for name in ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_XID_ERRORS"))

    probe.clear_faults(inventory[1].uuid)  # a reset clears it, as DCGM's field does
    assert values(render_metrics("h1", inventory, probe.sample(), COUNTERS), "DCGM_FI_DEV_XID_ERRORS")["1"] == "0"


def test_render_leaves_out_gpus_without_a_reading_and_escapes_labels() -> None:
    probe = SimulatedProbe("1xA10-24GB", host='we"ird\\host', clock=FakeClock())
    text = render_metrics('we"ird\\host', probe.inventory(), [], COUNTERS)
    assert "DCGM_FI_DEV_GPU_UTIL{" not in text and "# TYPE DCGM_FI_DEV_GPU_UTIL gauge" in text
    assert 'gpux_agent_gpus{Hostname="we\\"ird\\\\host"} 1' in text.splitlines()


def test_nvml_probe_reports_the_last_xid_critical_or_not() -> None:
    card = FakeCard(pending_xids=[13])
    probe = NvmlProbe(nvml=fake_nvml([card]), clock=FakeClock())
    [sample] = probe.sample()
    assert (sample.last_xid, sample.healthy) == (13, True)
    card.pending_xids = [79]
    assert probe.sample()[0].last_xid == 79
    probe.close()


async def test_server_answers_scrapes_over_http_and_survives_bad_requests() -> None:
    calls = {"n": 0}

    def render() -> str:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("a bug in rendering")
        return "up 1\n"

    server = MetricsServer(render, port=0)
    await server.start()
    url = f"http://127.0.0.1:{server.port}"
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            first = await http.get(url + "/metrics")
            assert (first.status_code, first.text) == (200, "up 1\n")
            assert first.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
            assert (await http.get(url + "/metrics")).status_code == 500
            assert (await http.get(url + "/other")).status_code == 404
            assert (await http.delete(url + "/metrics")).status_code == 405
            head = await http.head(url + "/metrics")
            assert head.status_code == 200 and head.content == b""
            # A client that sends half a request and hangs up is dropped without a reply.
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(b"GET /metr")
            writer.close()
            assert (await http.get(url + "/?x=1")).text == "up 1\n"
    finally:
        await server.stop()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(timeout=5) as http:
            await http.get(url + "/metrics")
