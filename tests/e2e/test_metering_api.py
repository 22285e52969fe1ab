"""Issue 4, must-show 3 over HTTP: forged or misplaced meter reports are refused, with no effect."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

from tests.e2e.client import Api, rfc3339


def _report(seq: int, uuids: list[str], start: datetime, seconds: int) -> dict:
    return {"seq": seq, "samples": [
        {"uuid": u, "ts": rfc3339(start + timedelta(seconds=i)), "util": 90, "mem_used_mb": 1000,
         "power_mw": 600_000, "energy_mj": 1_000 + i * 600_000, "temp_c": 60, "healthy": True}
        for i in range(seconds) for u in uuids]}


async def test_meter_reports_are_scoped_deduplicated_and_checked(admin: Api) -> None:
    owner = await admin.new_account("owner")
    host, agent = await owner.new_host(gpus=2)
    _, other_agent = await owner.new_host(gpus=2)
    tenant = await admin.new_account("tenant", deposit="10.00")
    mine = [g["uuid"] for g in (await owner.ok("GET", f"/v1/hosts/{host['id']}"))["gpus"]]
    start = datetime.now(timezone.utc) - timedelta(seconds=30)
    good = _report(1, mine, start, 10)

    first = await agent.request("POST", "/v1/agent/meter", json=good)
    replay = await agent.request("POST", "/v1/agent/meter", json=good)
    forged_replay = await agent.request("POST", "/v1/agent/meter", json=_report(1, mine, start, 9))
    stolen = await other_agent.request("POST", "/v1/agent/meter", json=_report(1, mine, start, 5))
    future = await agent.request("POST", "/v1/agent/meter",
                                 json=_report(2, mine, datetime.now(timezone.utc) + timedelta(minutes=10), 3))
    by_tenant = await tenant.request("POST", "/v1/agent/meter", json=_report(3, mine, start, 3))
    by_owner = await owner.request("GET", "/v1/agent/leases")
    unknown_field = await agent.request("POST", "/v1/agent/meter", json={**_report(4, mine, start, 1), "lease": 1})

    assert first.status_code == 200 and first.json() == {"seq": 1, "accepted": 20, "duplicate": False}
    assert replay.status_code == 200 and replay.json()["duplicate"] is True
    assert forged_replay.status_code == 409 and forged_replay.json()["error"]["code"] == "replayed_sequence"
    assert forged_replay.json()["expected_seq"] == 2
    assert stolen.status_code == 422 and "not this host's" in stolen.json()["error"]["message"]
    assert future.status_code == 422 and future.json()["error"]["field"] == "samples"
    assert by_tenant.status_code == 403 and by_owner.status_code == 403
    assert unknown_field.status_code == 400
    earnings = await owner.ok("GET", f"/v1/hosts/{host['id']}/earnings")
    assert earnings["charged"] == "0.00" and earnings["leases"] == 0
    assert await tenant.ok("GET", "/v1/accounts/me/balance") == {"available": "10.00", "held": "0.00"}
