"""Issue 12, must-show 4: a real `gpux agent --simulate --metrics-port` against a real `gpux serve`,
scraped over HTTP: dcgm-exporter's names, labels and units for every GPU, and the agent's own
figures (spool depth, reports sent/refused, live leases) following a real lease."""
from __future__ import annotations

import socket
from pathlib import Path

import httpx

from tests.e2e.client import Api
from tests.e2e.test_agent_settlement import until
from tests.support import ADMIN_KEY, start_agent, start_server

SERVER_ENV = {"GPUX_TICK_S": "0.5", "GPUX_SETTLE_S": "1", "GPUX_MIN_DURATION_S": "5"}
DCGM_NAMES = ("DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_DEV_POWER_USAGE", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION",
              "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_XID_ERRORS")
AGENT_NAMES = ("gpux_agent_spool_reports", "gpux_agent_meter_reports_sent_total",
               "gpux_agent_meter_reports_refused_total", "gpux_agent_leases")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Prometheus text -> {name: [(labels, value)]}, with every TYPE line checked to precede its series."""
    series: dict[str, list[tuple[dict[str, str], float]]] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            typed.add(line.split()[2])
            continue
        if not line or line.startswith("#"):
            continue
        head, value = line.rsplit(" ", 1)
        name, _, rest = head.partition("{")
        assert name in typed, line
        labels = dict(part.split("=", 1) for part in rest.rstrip("}").split(",")) if rest else {}
        series.setdefault(name, []).append(({k: v.strip('"') for k, v in labels.items()}, float(value)))
    return series



async def test_agent_metrics_endpoint_serves_dcgm_names_and_its_own(tmp_path: Path, fresh_db: str) -> None:
    server = start_server(tmp_path, database_url=fresh_db, extra_env=SERVER_ENV)
    policy = tmp_path / "policy.toml"
    policy.write_text('floor_price = "2.00"\nreclaim_notice_s = 30\nreclaim_rate_per_h = 0.0\n'
                      'offer_horizon_s = 3600\n')
    port = free_port()
    agent = None
    try:
        async with Api(server.base_url, ADMIN_KEY) as admin, httpx.AsyncClient(timeout=5) as http:
            owner = await admin.new_account("owner")
            host = await owner.ok("POST", "/v1/hosts", 201, json={"name": "sim-m", "fabric": "pod-a"})
            agent = start_agent(tmp_path, server.base_url, host["agent_token"], host="sim-m", simulate="2xH100-80GB",
                                policy=policy, extra_args=("--metrics-port", str(port)))
            url = f"http://127.0.0.1:{port}/metrics"

            async def scrape(check):
                try:
                    response = await http.get(url)
                except httpx.TransportError:
                    return None  # the agent is still starting
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
                series = parse(response.text)
                return series if check(series) else None

            def sent_and_sampled(series) -> bool:
                return (series.get("DCGM_FI_DEV_GPU_UTIL") is not None
                        and series["gpux_agent_meter_reports_sent_total"][0][1] >= 1)

            series = await until(lambda: scrape(sent_and_sampled))
            assert series, agent.log()[-3000:]

            # Every listed DCGM field, once per GPU, with dcgm-exporter's labels.
            for name in DCGM_NAMES:
                rows = series[name]
                assert sorted(labels["gpu"] for labels, _ in rows) == ["0", "1"], name
                for labels, _ in rows:
                    assert labels["UUID"].startswith("GPU-") and labels["modelName"] == "NVIDIA H100 80GB HBM3"
                    assert labels["Hostname"] == "sim-m" and labels["device"] == f"nvidia{labels['gpu']}"
            idle_power_w = [value for _, value in series["DCGM_FI_DEV_POWER_USAGE"]]
            assert all(40 <= w <= 100 for w in idle_power_w), idle_power_w  # W, not mW: an idle H100
            assert all(20 <= c <= 95 for _, c in series["DCGM_FI_DEV_GPU_TEMP"])
            assert all(0 <= mib < 81559 for _, mib in series["DCGM_FI_DEV_FB_USED"])
            assert all(e > 1e8 for _, e in series["DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION"])  # mJ since boot
            assert all(x == 0 for _, x in series["DCGM_FI_DEV_XID_ERRORS"])
            assert "# TYPE DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION counter" in (await http.get(url)).text
            for name in AGENT_NAMES:
                assert series[name][0][0] == {"Hostname": "sim-m"}, name
            assert series["gpux_agent_meter_reports_refused_total"][0][1] == 0
            assert series["gpux_agent_leases"][0][1] == 0

            # A lease on both GPUs: the agent's lease count and the cards' readings follow it.
            tenant = await admin.new_account("tenant", deposit="100.00")
            assert await until(lambda: _live(owner)), agent.log()[-3000:]
            await tenant.ok("POST", "/v1/bids", 201, json={
                "market": "H100-80GB/spot", "gpus": 2, "duration_s": 60, "limit_price": "3.00",
                "client_order_id": "metrics-job"})
            leased = await until(lambda: scrape(lambda s: s["gpux_agent_leases"][0][1] == 1
                                                and all(u >= 90 for _, u in s["DCGM_FI_DEV_GPU_UTIL"])), timeout=45)
            assert leased, agent.log()[-3000:]
            assert all(w > 100 for _, w in leased["DCGM_FI_DEV_POWER_USAGE"])

            # Not a metrics path, not a GET: answered, and the endpoint keeps serving.
            assert (await http.get(f"http://127.0.0.1:{port}/nope")).status_code == 404
            assert (await http.post(url, content=b"x")).status_code == 405
            assert (await http.get(url)).status_code == 200
    finally:
        if agent is not None:
            agent.stop()
        server.stop()


async def _live(owner: Api) -> bool:
    return len((await owner.ok("GET", "/v1/offers", params={"status": "live"}))["items"]) == 1
