"""Issue 4, must-show 1 and 2: real `gpux serve` and `gpux agent --simulate` processes. Bids become
leases, hooks run, samples are stored, settlement bills the tenant and credits the owner once (run
again at the same moment mid-lease it moves nothing; later, only the time metered since); an
exchange outage loses no sample and counts none twice; a silent agent stops billing and fails."""
from __future__ import annotations

import asyncio
import signal
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg

from exchange.settlement.service import settle
from tests.e2e.client import Api
from tests.support import ADMIN_KEY, run_audit, start_agent, start_server

SERVER_ENV = {"GPUX_TICK_S": "0.5", "GPUX_SETTLE_S": "1", "GPUX_SETTLE_CLOSE_AFTER_S": "2", "GPUX_FEE_BPS": "100",
              "GPUX_MIN_DURATION_S": "5", "GPUX_HOST_GRACE_S": "2", "GPUX_HOST_FAIL_S": "4"}


async def until(predicate, timeout: float = 30, every: float = 0.25):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(every)


def write_policy(tmp: Path, floor: str = "2.00") -> tuple[Path, Path]:
    hooks = tmp / "hooks.log"
    policy = tmp / "policy.toml"
    policy.write_text(
        f'floor_price = "{floor}"\nreclaim_notice_s = 30\nreclaim_rate_per_h = 0.0\noffer_horizon_s = 3600\n'
        f'on_lease_start = "echo start $GPUX_LEASE_ID $GPUX_GPU_UUIDS >> {hooks}"\n'
        f'on_lease_end = "echo end $GPUX_LEASE_ID >> {hooks}"\n')
    return policy, hooks



async def _owner_with_hosts(admin: Api, n: int) -> tuple[Api, list[dict]]:
    owner = await admin.new_account("owner")
    hosts = [await owner.ok("POST", "/v1/hosts", 201, json={"name": f"sim-{i}", "fabric": "pod-a"}) for i in range(n)]
    return owner, hosts


async def test_agents_bids_leases_hooks_samples_settlement(tmp_path: Path, fresh_db: str) -> None:
    server = start_server(tmp_path, database_url=fresh_db, extra_env=SERVER_ENV)
    policy, hooks = write_policy(tmp_path)
    agents = []
    try:
        async with Api(server.base_url, ADMIN_KEY) as admin:
            # Arrange: two simulated 8-GPU hosts whose agents publish offers from the policy.
            owner, hosts = await _owner_with_hosts(admin, 2)
            agents = [start_agent(tmp_path, server.base_url, h["agent_token"], host=f"sim-{i}", policy=policy)
                      for i, h in enumerate(hosts)]

            async def offers_live():
                return len((await owner.ok("GET", "/v1/offers", params={"status": "live"}))["items"]) == 2

            assert await until(offers_live), [a.log() for a in agents]
            tenant = await admin.new_account("tenant", deposit="100.00")

            # Act: two 8-GPU bids of 10 s: one per host.
            for i in range(2):
                await tenant.ok("POST", "/v1/bids", 201, json={
                    "market": "H100-80GB/spot", "gpus": 8, "duration_s": 10, "limit_price": "3.00",
                    "client_order_id": f"job-{i}"})

            async def leases_closed():
                items = (await tenant.ok("GET", "/v1/leases"))["items"]
                done = len(items) == 2 and all(le["status"] == "ended" and le["hold"] == "0.00" for le in items)
                return items if done else None

            leases = await until(leases_closed, timeout=45)

            # Assert: leases on both hosts, billed from metered samples at the spot price (the floor:
            # no competing bid), the owner credited less the 1% fee, the rest of the holds released.
            assert leases, (await tenant.ok("GET", "/v1/leases"), [a.log()[-2000:] for a in agents])
            assert {le["host_id"] for le in leases} == {h["id"] for h in hosts}
            for lease in leases:
                assert 7 * 8 / 3600 <= float(lease["metered_gpu_hours"]) <= 10 * 8 / 3600
                assert lease["billed_gpu_hours"] == lease["metered_gpu_hours"]
                assert lease["price"] == "2.00" and float(lease["energy_kwh"]) > 0
            charged = sum(round(float(le["charged"]) * 1e6) for le in leases)
            balance = await tenant.ok("GET", "/v1/accounts/me/balance")
            assert balance["held"] == "0.00" and round(float(balance["available"]) * 1e6) == 100_000_000 - charged
            earnings = [await owner.ok("GET", f"/v1/hosts/{h['id']}/earnings") for h in hosts]
            earned = sum(round(float(e["earned"]) * 1e6) for e in earnings)
            assert earned == charged - sum(round(float(le["fees"]) * 1e6) for le in leases) and earned > 0

            # Hooks ran once per lease start and end, with the lease's GPU UUIDs.
            async def hooks_done():
                return hooks.exists() and hooks.read_text().count("end ") == 2

            assert await until(hooks_done), hooks.read_text() if hooks.exists() else "no hook ran"
            lines = hooks.read_text().splitlines()
            for lease in leases:
                assert f"start {lease['id']} {','.join(lease['gpu_uuids'])}" in lines
                assert f"end {lease['id']}" in lines

        audit = run_audit(fresh_db)
        assert audit.returncode == 0, audit.stdout
    finally:
        for agent in agents:
            agent.stop()
        server.stop()


# The server's own settlement never runs in the next test (its first run would be an hour in): the
# test settles at moments of its choosing, while the lease is still open and metered.
MANUAL_SETTLE_ENV = {**SERVER_ENV, "GPUX_SETTLE_S": "3600"}
PRICE_MICROS_PER_H = 2_000_000  # the policy's floor; no competing bid, so the spot price is the floor
FEE_BPS = 100


async def _samples_past(conn: asyncpg.Connection, uuids: list[str], moment: datetime) -> bool:
    """Whether every GPU has reported a sample at or after `moment`. Reports arrive in order, so
    then every sample before `moment` is stored, and so is the one that closes the last interval
    before it: settling at `moment` sees all the metered time it ever will."""
    count = await conn.fetchval("SELECT count(DISTINCT uuid) FROM meter_samples WHERE uuid = ANY($1) AND ts >= $2",
                                uuids, moment)
    return count == len(uuids)


async def _money(conn: asyncpg.Connection, lease_id: int, tenant_id: int, owner_id: int) -> dict:
    """The lease's settlement columns and the ledger around it."""
    lease = dict(await conn.fetchrow(
        "SELECT status, closed, metered_gpu_s, billed_gpu_s, billed_value, billed_amount, fees_amount, hold_amount,"
        " settled_at FROM leases WHERE id = $1", lease_id))
    books = {(r["account_id"], r["kind"]): r["balance"] for r in await conn.fetch(
        "SELECT account_id, kind, balance FROM ledger_accounts WHERE account_id = ANY($1) OR kind = 'fees'",
        [tenant_id, owner_id])}
    settles = [[(p["account_id"], p["kind"], p["amount"]) for p in await conn.fetch(
        "SELECT la.account_id, la.kind, p.amount FROM postings p JOIN ledger_accounts la ON la.id = p.ledger_account_id"
        " WHERE p.transfer_id = $1 ORDER BY p.id", t["id"])]
        for t in await conn.fetch("SELECT id FROM transfers WHERE kind = 'settle' AND ref_type = 'lease'"
                                  " AND ref_id = $1 ORDER BY id", lease_id)]
    return {"lease": lease, "books": books, "settles": settles}


async def test_settlement_run_again_mid_lease_bills_only_new_metered_time(tmp_path: Path, fresh_db: str) -> None:
    server = start_server(tmp_path, database_url=fresh_db, extra_env=MANUAL_SETTLE_ENV)
    policy, _ = write_policy(tmp_path)
    agent = None
    conn = await asyncpg.connect(fresh_db)
    try:
        async with Api(server.base_url, ADMIN_KEY) as admin:
            # Arrange: one simulated host; a 4-GPU spot lease of 120 s, far longer than the test.
            owner, hosts = await _owner_with_hosts(admin, 1)
            agent = start_agent(tmp_path, server.base_url, hosts[0]["agent_token"], host="sim-0", policy=policy)

            async def offer_live():
                return (await owner.ok("GET", "/v1/offers", params={"status": "live"}))["items"]

            assert await until(offer_live), agent.log()
            tenant = await admin.new_account("tenant", deposit="100.00")
            await tenant.ok("POST", "/v1/bids", 201, json={"market": "H100-80GB/spot", "gpus": 4, "duration_s": 120,
                                                           "limit_price": "3.00", "client_order_id": "long"})

            async def leased():
                items = (await tenant.ok("GET", "/v1/leases"))["items"]
                return items and items[0]["status"] == "active" and items[0]

            lease = await until(leased)
            assert lease, server.log()[-2000:]
        lease_id, uuids = lease["id"], lease["gpu_uuids"]
        tenant_id, owner_id = tenant.account_id, owner.account_id  # type: ignore[attr-defined]
        start_at = await conn.fetchval("SELECT start_at FROM leases WHERE id = $1", lease_id)
        unsettled = await _money(conn, lease_id, tenant_id, owner_id)
        # The hold covers the limit for the whole duration: 3.00 × 4 GPUs × 120 s = 0.40.
        assert unsettled["lease"]["hold_amount"] == 400_000 and unsettled["settles"] == []

        async def settle_at(moment: datetime):
            assert await until(lambda: _samples_past(conn, uuids, moment), timeout=30), agent.log()[-2000:]
            return await settle(conn, moment, fee_bps=FEE_BPS, max_gap_s=5, close_after_s=2)

        # Act 1: settle at a moment a few seconds into the lease, then again at that same moment.
        await asyncio.sleep(3)
        first_at = datetime.now(timezone.utc) - timedelta(seconds=0.5)
        first = await settle_at(first_at)
        after_first = await _money(conn, lease_id, tenant_id, owner_id)
        again = await settle_at(first_at)
        after_again = await _money(conn, lease_id, tenant_id, owner_id)

        # Assert 1: billed once, from the lease's metered GPU-seconds at the floor price, in one
        # transfer tenant held → owner available less the 1% fee; the second run moved nothing.
        le = after_first["lease"]
        gpu_s = le["billed_gpu_s"]
        elapsed_s = (first_at - start_at).total_seconds()
        assert le["metered_gpu_s"] == gpu_s and 4 * (elapsed_s - 1) <= gpu_s <= 4 * elapsed_s, (gpu_s, elapsed_s)
        charge = PRICE_MICROS_PER_H * gpu_s // 3600
        fee = charge * FEE_BPS // 10_000
        assert (le["status"], le["closed"], le["settled_at"]) == ("active", False, first_at)
        assert (le["billed_value"], le["billed_amount"], le["fees_amount"], le["hold_amount"]) == (
            PRICE_MICROS_PER_H * gpu_s, charge, fee, 400_000 - charge)
        assert charge > 0 and (first.billed, first.charged_micros) == (1, charge)
        assert after_first["settles"] == [[(tenant_id, "held", -charge), (owner_id, "available", charge - fee),
                                           (None, "fees", fee)]]
        books = unsettled["books"]
        assert after_first["books"] == {**books, (tenant_id, "held"): books[(tenant_id, "held")] - charge,
                                        (owner_id, "available"): books[(owner_id, "available")] + charge - fee,
                                        (None, "fees"): books[(None, "fees")] + fee}
        assert (again.billed, again.charged_micros) == (0, 0) and after_again == after_first

        # Act 2: settle 3 s later, the lease still running.
        second_at = first_at + timedelta(seconds=3)
        while datetime.now(timezone.utc) < second_at:
            await asyncio.sleep(0.1)
        later = await settle_at(second_at)
        after_later = await _money(conn, lease_id, tenant_id, owner_id)

        # Assert 2: only the 3 s × 4 GPUs metered since are billed, in one more transfer.
        le2 = after_later["lease"]
        assert le2["billed_gpu_s"] == gpu_s + 12 and le2["metered_gpu_s"] == gpu_s + 12
        charge2 = PRICE_MICROS_PER_H * (gpu_s + 12) // 3600 - charge
        fee2 = (charge + charge2) * FEE_BPS // 10_000 - fee  # the fee is taken on the running total
        assert (le2["status"], le2["closed"], le2["settled_at"]) == ("active", False, second_at)
        assert (le2["billed_value"], le2["billed_amount"], le2["fees_amount"], le2["hold_amount"]) == (
            PRICE_MICROS_PER_H * (gpu_s + 12), charge + charge2, fee + fee2, 400_000 - charge - charge2)
        assert charge2 > 0 and (later.billed, later.charged_micros) == (1, charge2)
        assert after_later["settles"] == after_first["settles"] + [
            [(tenant_id, "held", -charge2), (owner_id, "available", charge2 - fee2), (None, "fees", fee2)]]
        books = after_first["books"]
        assert after_later["books"] == {**books, (tenant_id, "held"): books[(tenant_id, "held")] - charge2,
                                        (owner_id, "available"): books[(owner_id, "available")] + charge2 - fee2,
                                        (None, "fees"): books[(None, "fees")] + fee2}
        assert run_audit(fresh_db).returncode == 0
    finally:
        await conn.close()
        if agent:
            agent.stop()
        server.stop()


async def test_outage_loses_no_sample_and_counts_none_twice(tmp_path: Path, fresh_db: str) -> None:
    server = start_server(tmp_path, database_url=fresh_db, extra_env=SERVER_ENV)
    port = int(server.base_url.rsplit(":", 1)[1])
    agent = None
    try:
        async with Api(server.base_url, ADMIN_KEY) as admin:
            owner, hosts = await _owner_with_hosts(admin, 1)
        agent = start_agent(tmp_path, server.base_url, hosts[0]["agent_token"], host="sim-0")
        conn = await asyncpg.connect(fresh_db)
        try:
            async def reports(n):
                async def enough():
                    return await conn.fetchval("SELECT count(*) FROM meter_reports") >= n
                return enough

            assert await until(await reports(3)), agent.log()
            # Act: the exchange goes away for a while, then comes back on the same port.
            server.stop()
            await asyncio.sleep(4)
            before = await conn.fetchval("SELECT count(*) FROM meter_reports")
            server = start_server(tmp_path, database_url=fresh_db, extra_env=SERVER_ENV, port=port)
            assert await until(await reports(before + 8)), agent.log()
            agent.stop()
            await asyncio.sleep(0.5)
            seqs = [r["seq"] for r in await conn.fetch("SELECT seq FROM meter_reports ORDER BY seq")]
            gaps = await conn.fetchval(
                "SELECT max(d) FROM (SELECT extract(epoch FROM ts - lag(ts) OVER (PARTITION BY uuid ORDER BY ts)) AS d"
                " FROM meter_samples) x")
            per_gpu = await conn.fetch("SELECT uuid, count(*) AS n FROM meter_samples GROUP BY uuid")
        finally:
            await conn.close()
        # Assert: every report arrived, in order, once; the samples of the outage are all there.
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
        assert gaps is not None and float(gaps) < 0.5, gaps  # 0.2 s sampling: no hole across the outage
        assert len({r["n"] for r in per_gpu}) == 1 and len(per_gpu) == 8
    finally:
        if agent:
            agent.stop()
        server.stop()


async def test_silent_agent_stops_billing_and_its_lease_fails(tmp_path: Path, fresh_db: str) -> None:
    server = start_server(tmp_path, database_url=fresh_db, extra_env=SERVER_ENV)
    policy, _ = write_policy(tmp_path)
    agent = None
    try:
        async with Api(server.base_url, ADMIN_KEY) as admin:
            owner, hosts = await _owner_with_hosts(admin, 1)
            agent = start_agent(tmp_path, server.base_url, hosts[0]["agent_token"], host="sim-0", policy=policy)

            async def offer_live():
                return (await owner.ok("GET", "/v1/offers", params={"status": "live"}))["items"]

            assert await until(offer_live), agent.log()
            tenant = await admin.new_account("tenant", deposit="100.00")
            await tenant.ok("POST", "/v1/bids", 201, json={"market": "H100-80GB/spot", "gpus": 4, "duration_s": 600,
                                                           "limit_price": "3.00", "client_order_id": "long"})

            async def billed_some():
                items = (await tenant.ok("GET", "/v1/leases"))["items"]
                return items and float(items[0]["billed_gpu_hours"]) > 0 and items[0]

            assert await until(billed_some), agent.log()[-3000:]
            # Act: the agent dies mid-lease without a word.
            agent.stop(signal.SIGKILL)

            async def failed():
                items = (await tenant.ok("GET", "/v1/leases"))["items"]
                return items[0]["status"] == "failed" and items[0]["hold"] == "0.00" and items[0]

            lease = await until(failed, timeout=60)
            final = [{k: le[k] for k in ("status", "end_reason", "end_at", "hold", "billed_gpu_hours")}
                     for le in (await tenant.ok("GET", "/v1/leases"))["items"]]
        conn = await asyncpg.connect(fresh_db)
        try:
            last_sample = await conn.fetchval("SELECT max(ts) FROM meter_samples")
            row = await conn.fetchrow("SELECT start_at, end_at, billed_gpu_s FROM leases")
        finally:
            await conn.close()
        # Assert: it ended as failed at its last sample, and billing stopped there.
        assert lease and lease["end_reason"] == "host_failed", (final, server.log()[-1500:])
        assert abs((row["end_at"] - last_sample).total_seconds()) < 0.01
        assert row["billed_gpu_s"] <= 4 * (last_sample - row["start_at"]).total_seconds()
        assert run_audit(fresh_db).returncode == 0
    finally:
        if agent:
            agent.stop()
        server.stop()
