"""Issue 11 over HTTP: one agent's impossible readings (energy near 2^63, power above its card's
bound, memory above its inventory, utilisation 150, a counter jumping faster than physics) are
refused sample by sample and counted; the good samples of the same report are kept and billed, and
every lease still settles, ends and releases its hold."""
from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx

from agents.runner import ExchangeClient
from exchange.metering.schemas import MeterReport, MeterSample
from tests.e2e.client import Api, in_hours, rfc3339
from tests.e2e.test_agent_settlement import until
from tests.support import ADMIN_KEY, start_server

SERVER_ENV = {"GPUX_TICK_S": "0.5", "GPUX_SETTLE_S": "1", "GPUX_SETTLE_CLOSE_AFTER_S": "2", "GPUX_MIN_DURATION_S": "5"}
POWER_MW = 650_000
NEAR_2_63 = 9_000_000_000_000_000_000



def _sample(uuid: str, at: datetime, energy_mj: int, **reading: int) -> dict:
    return {"uuid": uuid, "ts": rfc3339(at), "util": 90, "mem_used_mb": 70_000, "power_mw": POWER_MW,
            "energy_mj": energy_mj, "temp_c": 60, "healthy": True} | reading


def _refused_counts(metrics_text: str) -> dict[str, float]:
    return {m[1]: float(m[2]) for m in re.finditer(
        r'^gpux_meter_samples_refused_total\{reason="([a-z_]+)"\} (\S+)$', metrics_text, re.M)}


async def test_impossible_readings_are_refused_counted_and_every_lease_settles(tmp_path: Path, fresh_db: str) -> None:
    server = start_server(tmp_path, database_url=fresh_db, extra_env=SERVER_ENV)
    try:
        async with Api(server.base_url, ADMIN_KEY) as admin:
            # Arrange: one 4-GPU H100 host, two tenants with a 2-GPU spot lease of 20 s each.
            owner = await admin.new_account("owner")
            host, agent = await owner.new_host(gpus=4)
            await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": 4, "floor_price": "2.00",
                                                            "available_until": in_hours(1)})
            tenants = [await admin.new_account("tenant", deposit="10.00") for _ in range(2)]
            for i, tenant in enumerate(tenants):
                await tenant.ok("POST", "/v1/bids", 201, json={
                    "market": "H100-80GB/spot", "gpus": 2, "duration_s": 20, "limit_price": "3.00",
                    "client_order_id": f"job-{i}"})

            async def leased():
                found = [(await t.ok("GET", "/v1/leases"))["items"] for t in tenants]
                return [items[0] for items in found] if all(items for items in found) else None

            victim, other = await until(leased)
            start = max(datetime.fromisoformat(le["start_at"].replace("Z", "+00:00")) for le in (victim, other))

            async def started_8_s_ago():
                return datetime.now(timezone.utc) >= start + timedelta(seconds=8)

            await until(started_8_s_ago)

            # Act: one report of 8 s on all four GPUs; the agent's readings on the victim's GPUs and
            # one of the other lease's are impossible at some instants.
            v1, v2 = victim["gpu_uuids"]
            o1, o2 = other["gpu_uuids"]
            samples = []
            for i in range(9):
                at = start + timedelta(seconds=i)
                energy = 1_000_000 + i * POWER_MW
                samples += [_sample(v1, at, NEAR_2_63 if i == 4 else energy),
                            _sample(v2, at, energy, **({"power_mw": 2_000_000} if i == 4 else {})),
                            _sample(o1, at, energy, **({"mem_used_mb": 90_000} if i == 4 else {})),
                            _sample(o2, at, energy + (50_000_000 if i == 4 else 0),
                                    **({"util": 150} if i == 6 else {}))]
            ack = await agent.request("POST", "/v1/agent/meter", json={"seq": 1, "samples": samples})
            all_bad = await agent.request("POST", "/v1/agent/meter", json={"seq": 2, "samples": [
                _sample(v1, start + timedelta(seconds=9), NEAR_2_63)]})
            metrics = httpx.get(server.base_url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text

            # Assert: 5 refused with their reasons, 31 kept; a report of only bad samples refused whole.
            assert ack.status_code == 200, ack.text
            assert ack.json() == {"seq": 1, "accepted": 31, "duplicate": False, "refused": 5, "refused_reasons": {
                "energy_above_ceiling": 1, "energy_rise_above_bound": 1, "memory_above_inventory": 1,
                "power_above_bound": 1, "util_out_of_range": 1}}
            assert all_bad.status_code == 422
            body = all_bad.json()
            assert body["error"]["code"] == "invalid_field" and body["error"]["field"] == "samples"
            assert body["refused_reasons"] == {"energy_above_ceiling": 1}
            assert _refused_counts(metrics) == {"energy_above_ceiling": 2.0, "energy_rise_above_bound": 1.0,
                                                "memory_above_inventory": 1.0, "power_above_bound": 1.0,
                                                "util_out_of_range": 1.0}

            # The agent's own client reads such an answer as delivered (nothing to resend), the
            # refused samples named; a report refused whole as rejected (dropped, never blocking).
            client = ExchangeClient(server.base_url, host["agent_token"], timeout_s=10)
            try:
                at = start + timedelta(seconds=9)
                mixed = await client.send_meter(MeterReport(seq=3, samples=[
                    MeterSample(uuid=o2, ts=at, util=90, mem_used_mb=1, power_mw=POWER_MW,
                                energy_mj=1_000_000 + 9 * POWER_MW, temp_c=60, healthy=True),
                    MeterSample(uuid=o1, ts=at, util=101, mem_used_mb=1, power_mw=POWER_MW,
                                energy_mj=1_000_000 + 9 * POWER_MW, temp_c=60, healthy=True)]))
                rejected = await client.send_meter(MeterReport(seq=4, samples=[
                    MeterSample(uuid=o1, ts=at, util=101, mem_used_mb=1, power_mw=POWER_MW,
                                energy_mj=1_000_000 + 9 * POWER_MW, temp_c=60, healthy=True)]))
            finally:
                await client.aclose()
            assert (mixed.outcome, mixed.ack_through) == ("accepted", 3)
            assert "1 sample(s) refused" in mixed.detail and "util_out_of_range" in mixed.detail
            assert (rejected.outcome, rejected.ack_through) == ("rejected", 4)

            # Every lease is billed for its metered time, ends, closes and releases its hold.
            async def all_closed():
                items = [(await t.ok("GET", "/v1/leases"))["items"][0] for t in tenants]
                return items if all(le["status"] == "ended" and le["hold"] == "0.00" for le in items) else None

            closed = await until(all_closed, timeout=60)
            assert closed, "a lease never closed"
            assert all(le["charged"] != "0.00" and float(le["energy_kwh"]) > 0 for le in closed), closed
            earnings = await owner.ok("GET", f"/v1/hosts/{host['id']}/earnings")
            assert earnings["leases"] == 2 and earnings["charged"] != "0.00"
    finally:
        server.stop()
