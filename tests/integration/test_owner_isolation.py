"""Isolation between owners (issue 11): a fabric is its owner's, so a multi-host gang never spans
owners; a reclaim touches only the reclaiming owner's leases, also of a gang placed across owners
before migration 0009; a GPU moves to another host only once its host released it and no live lease
holds it, and its samples from the new host are never billed to the old host's lease."""
from __future__ import annotations

from datetime import timedelta
from importlib import resources

import pytest

from exchange.accounts.schemas import AccountCreate
from exchange.accounts.service import create_account
from exchange.core.auth import Principal
from exchange.core.errors import ApiError
from exchange.hosts.schemas import Inventory, InventoryGpu
from exchange.hosts.service import put_inventory
from exchange.ledger.audit import format_report, run_audit
from exchange.reclaims.schemas import ReclaimCreate
from exchange.reclaims.service import create_reclaim
from exchange.settlement.service import settle
from tests.integration.scenario import START, Scenario

MODEL = "H100-80GB"


async def _other_owner_host(s: Scenario, name: str, **kwargs) -> tuple[int, Principal, list[str]]:
    """A host of a second owner (the scenario's owner stays current afterwards)."""
    first = s.owner_id
    s.owner_id = (await create_account(s.ctx, AccountCreate(name=f"owner-{name}", role="owner"))).id
    agent, uuids = await s.add_host(name, **kwargs)
    other, s.owner_id = s.owner_id, first
    return other, agent, uuids


async def _leases(s: Scenario) -> list[dict]:
    return [dict(r) for r in await s.ctx.pool.fetch(
        "SELECT l.*, h.owner_id FROM leases l JOIN hosts h ON h.id = l.host_id ORDER BY l.id")]


def _inventory(uuids: list[str]) -> Inventory:
    return Inventory(gpus=[InventoryGpu(uuid=u, model=MODEL, memory_mb=81559) for u in uuids])


async def _audit(s: Scenario) -> None:
    async with s.ctx.pool.acquire() as conn:
        breaches = await run_audit(conn, now=s.clock())
    assert breaches == [], format_report(breaches)


async def test_a_two_host_gang_never_spans_owners_in_one_fabric_name(s: Scenario) -> None:
    # Arrange: owner A's h1 (1.00) and owner B's hb (1.00) and A's h2 (1.50), all in fabric "pod-a":
    # the cheapest two whole hosts are A's and B's.
    await s.market(gpus=8, floor="1.00")
    other, _, _ = await _other_owner_host(s, "hb", gpus=8, floor="1.00")
    await s.add_host("h2", gpus=8, floor="1.50")

    # Act: a gang of two whole hosts.
    await s.bid(market=f"{MODEL}/spot", gpus=16, duration_s=3600, limit="2.00")
    await s.tick()

    # Assert: it fills on A's two hosts; B's host is not part of it.
    leases = await _leases(s)
    assert len(leases) == 2 and {le["owner_id"] for le in leases} == {s.owner_id}, leases
    await _audit(s)


async def test_a_reclaim_never_touches_another_owners_lease_of_a_gang_from_before_0009(s: Scenario) -> None:
    # Arrange: a gang across A's h1 and B's hb, placed as before migration 0009 (fabrics global by
    # name: the book is made to key fabrics by name only), then listed as the migration lists them.
    await s.market(gpus=8, floor="1.00")
    other, _, _ = await _other_owner_host(s, "hb", gpus=8, floor="1.00", reclaim_notice_s=60)
    s.sync.fabric_id = lambda owner_id, name: s.sync.fabric_ids.setdefault(("any", name), 1)
    await s.bid(market=f"{MODEL}/spot", gpus=16, duration_s=3600, limit="2.00")
    await s.tick()
    before = await _leases(s)
    assert {le["owner_id"] for le in before} == {s.owner_id, other}
    migration = (resources.files("exchange.db") / "migrations" / "0009_owner_isolation.sql").read_text()
    await s.ctx.pool.execute(migration[migration.index("INSERT INTO gangs_spanning_owners_before_0009"):])
    b_lease = next(le for le in before if le["owner_id"] == other)
    a_lease = next(le for le in before if le["owner_id"] == s.owner_id)

    # Act: A takes all its GPUs back.
    s.clock.advance(10)
    reclaim = await create_reclaim(s.ctx, Principal(role="owner", account_id=s.owner_id),
                                   ReclaimCreate(model=MODEL, gpus=8))

    # Assert: A's lease is under notice; B's runs on untouched; A's answer shows only A's lease.
    after = {le["id"]: le for le in await _leases(s)}
    assert after[a_lease["id"]]["status"] == "ending" and after[a_lease["id"]]["reclaim_id"] == reclaim.id
    assert after[b_lease["id"]]["status"] == "active" and after[b_lease["id"]]["reclaim_id"] is None
    assert [(le.id, le.host_id) for le in reclaim.leases] == [(a_lease["id"], a_lease["host_id"])]
    await _audit(s)


async def test_a_gpu_moves_to_another_owners_host_only_once_released_and_not_leased(s: Scenario) -> None:
    # Arrange: A's h1 leases one GPU for 600 s; B has a host of its own.
    await s.market(gpus=4, floor="1.00")
    _, agent_b, uuids_b = await _other_owner_host(s, "hb", gpus=2, floor="3.00")  # dearer than the bid
    await s.bid(market=f"{MODEL}/spot", gpus=1, duration_s=600, limit="2.00")
    await s.tick()
    lease = (await _leases(s))[0]
    moving = lease["gpu_uuids"][0]
    rest = [u for u in s.uuids if u != moving]

    # Act/Assert: B cannot claim it while A has it, nor once A dropped it while the lease holds it;
    # each refusal names the GPU and changes nothing.
    for step in ("present", "dropped"):
        if step == "dropped":
            await put_inventory(s.ctx, s.agent, _inventory(rest))
        with pytest.raises(ApiError) as refused:
            await put_inventory(s.ctx, agent_b, _inventory(uuids_b + [moving]))
        assert refused.value.status_code == 409 and moving in refused.value.message, step
        row = await s.ctx.pool.fetchrow("SELECT host_id, present FROM gpus WHERE uuid = $1", moving)
        assert (row["host_id"], row["present"]) == (s.agent.host_id, step == "present")
    # A keeps working: its meter report of the leased GPU is taken (the first half of the lease).
    s.clock.advance(300)
    assert (await s.report(1, [moving], START, 300)).accepted == 300
    await _audit(s)

    # Once the lease is over the GPU is free to move, and B reports it (samples dated in the lease's
    # second half, as a host with a wrong clock could).
    s.clock.advance(400)
    await s.tick()
    moved = await put_inventory(s.ctx, agent_b, _inventory(uuids_b + [moving]))
    assert moving in [g.uuid for g in moved.gpus]
    assert (await s.report(1, [moving], START + timedelta(seconds=300), 300, agent=agent_b)).accepted == 300
    s.clock.advance(60)
    async with s.ctx.pool.acquire() as conn:
        await settle(conn, s.clock(), fee_bps=0, max_gap_s=5.0, close_after_s=30)

    # Assert: the old host's lease is billed only for its own host's samples of the GPU (one a
    # second from 0 s to 299 s cover 299 s; with the new host's it would be 599 s).
    billed = await s.ctx.pool.fetchrow("SELECT status, closed, metered_gpu_s FROM leases WHERE id = $1", lease["id"])
    assert billed["status"] == "ended" and billed["closed"] and billed["metered_gpu_s"] == 299, dict(billed)
    await _audit(s)
