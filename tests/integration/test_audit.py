"""`gpux audit`: passes on a market built through the real services, and names each invariant when
the database is corrupted behind the services' back (one corruption per check, each on its own copy
of the built market, made with CREATE DATABASE … TEMPLATE)."""
from __future__ import annotations

from datetime import timedelta

import asyncpg
import pytest
from urllib.parse import urlsplit

from exchange.accounts.schemas import AccountCreate
from exchange.accounts.service import create_account
from exchange.bids.service import cancel_bid
from exchange.core.auth import Principal
from exchange.hosts.schemas import Inventory, InventoryGpu
from exchange.hosts.service import put_inventory
from exchange.ledger.audit import CHECKS, format_report, run_audit
from exchange.leases.lifecycle import fail_silent_hosts
from exchange.reclaims.schemas import ReclaimCreate
from exchange.reclaims.service import create_reclaim, release_reclaim
from exchange.settlement.service import settle
from tests.conftest import create_database
from tests.integration.scenario import START, Scenario
from tests.support import run_audit as run_audit_cli

END = START + timedelta(seconds=950)
SETTINGS = {"close_after_s": 30, "settle_s": 60, "host_grace_s": 30}


async def _settle(s: Scenario) -> None:
    async with s.ctx.pool.acquire() as conn:
        await settle(conn, s.clock(), fee_bps=s.ctx.settings.fee_bps, max_gap_s=5.0, close_after_s=30)


async def _build(s: Scenario) -> None:
    """Two owners, two tenants, both tiers: a firm lease that completed, a spot lease reclaimed inside
    the free window (refunded) whose bid was requeued and filled again, then reclaimed again (under
    notice now), a lease failed with its silent host, a firm lease running, an open bid that cannot
    fill, a cancelled one, a released reclaim and an active one."""
    await s.market(gpus=8, floor="1.00", firm_hours=24)
    tenant_b = await s.new_tenant("tenant-b")
    owner = Principal(role="owner", account_id=s.owner_id)
    first_owner = s.owner_id
    s.owner_id = (await create_account(s.ctx, AccountCreate(name="owner2", role="owner"))).id
    agent2, uuids2 = await s.add_host("h2", gpus=4, floor="1.00", firm_hours=24, model="A100-80GB")
    s.owner_id = first_owner

    await s.bid(market="H100-80GB/firm", gpus=2, duration_s=600, limit="5.00", coid="firm")
    await s.bid(market="H100-80GB/spot", gpus=2, duration_s=3600, limit="3.00", coid="spot", tenant=tenant_b,
                requeue_on_preempt=True)
    await s.bid(market="H100-80GB/spot", gpus=1, duration_s=3600, limit="0.50", coid="low")
    gone = await s.bid(market="H100-80GB/firm", gpus=1, duration_s=600, limit="5.00", coid="gone")
    await cancel_bid(s.ctx, s.tenant_id, gone.id)
    await s.bid(market="A100-80GB/firm", gpus=2, duration_s=3600, limit="5.00", coid="a100", tenant=tenant_b)
    await s.tick()

    s.clock.advance(700)
    await s.report(1, s.uuids, START, 700)
    await s.report(1, uuids2, START, 100, agent=agent2, power_mw=350_000)  # then h2 falls silent
    await s.tick()  # the firm lease ends at its planned end
    await _settle(s)
    async with s.ctx.pool.acquire() as conn:
        assert await fail_silent_hosts(conn, s.clock(), grace_s=30, fail_s=300) == 1
    await _settle(s)

    # The owner takes h1 back: 6 idle GPUs and the spot lease (inside its free window).
    first = await create_reclaim(s.ctx, owner, ReclaimCreate(model="H100-80GB", gpus=8))
    s.clock.advance(130)
    await s.report(2, s.uuids, START + timedelta(seconds=700), 130)
    await s.tick()  # the notice ran out
    s.clock.advance(60)
    await _settle(s)  # refunds and closes the spot lease; its bid is back in the book
    await release_reclaim(s.ctx, owner, first.id)
    await s.bid(market="H100-80GB/firm", gpus=4, duration_s=3600, limit="5.00", coid="firm-2")
    await s.tick()  # the requeued spot bid and the new firm bid fill on h1
    s.clock.advance(60)
    await s.report(3, s.uuids, START + timedelta(seconds=830), 120)
    await _settle(s)
    # 2 idle GPUs and the requeued spot lease, which is under notice at the end.
    await create_reclaim(s.ctx, owner, ReclaimCreate(model="H100-80GB", gpus=4))
    await _settle(s)
    assert s.clock() == END


@pytest.fixture(scope="module")
async def market_db(pg_server_url: str, template_db: str) -> str:
    """The name of a database holding the built market, used as the template of each corrupted copy."""
    url = await create_database(pg_server_url, template_db)
    s = await Scenario.create(url, fee_bps=100)
    try:
        await _build(s)
    finally:
        await s.close()
    return _name(url)


def _name(url: str) -> str:
    return urlsplit(url).path.lstrip("/")


@pytest.fixture
async def copy(pg_server_url: str, market_db: str):
    url = await create_database(pg_server_url, market_db)
    conn = await asyncpg.connect(url)
    yield conn, url
    await conn.close()


# The leases of the built market, by their bid's client order id.
FIRM = "(SELECT l.id FROM leases l JOIN bids b ON b.id = l.bid_id WHERE b.client_order_id = 'firm')"
SPOT_1 = "(SELECT min(l.id) FROM leases l JOIN bids b ON b.id = l.bid_id WHERE b.client_order_id = 'spot')"
A100 = "(SELECT l.id FROM leases l JOIN bids b ON b.id = l.bid_id WHERE b.client_order_id = 'a100')"
FIRM_2 = "(SELECT l.id FROM leases l JOIN bids b ON b.id = l.bid_id WHERE b.client_order_id = 'firm-2')"
SPOT_2 = "(SELECT max(l.id) FROM leases l JOIN bids b ON b.id = l.bid_id WHERE b.client_order_id = 'spot')"
H2 = "(SELECT id FROM hosts WHERE name = 'h2')"
TENANT = "(SELECT id FROM accounts WHERE name = 'tenant')"
TENANT_B = "(SELECT id FROM accounts WHERE name = 'tenant-b')"
OWNER = "(SELECT id FROM accounts WHERE name = 'owner')"
OWNER_2 = "(SELECT id FROM accounts WHERE name = 'owner2')"


def book(account: str, kind: str) -> str:
    return f"(SELECT id FROM ledger_accounts WHERE account_id = {account} AND kind = '{kind}')"


FEES = "(SELECT id FROM ledger_accounts WHERE account_id IS NULL AND kind = 'fees')"
WORLD = "(SELECT id FROM ledger_accounts WHERE account_id IS NULL AND kind = 'world')"


def transfer(kind: str, legs: list[tuple[str, int]], lease: str | None = None) -> str:
    """A balanced transfer posted the normal way (triggers keep the balances)."""
    values = ", ".join(f"((SELECT id FROM t), {b}, {amount})" for b, amount in legs)
    ref = f"'lease', {lease}" if lease else "NULL, NULL"
    return (f"WITH t AS (INSERT INTO transfers (kind, account_id, ref_type, ref_id, created_at)"
            f" VALUES ('{kind}', NULL, {ref}, '{END.isoformat()}') RETURNING id)"
            f" INSERT INTO postings (transfer_id, ledger_account_id, amount) VALUES {values}")


BEHIND_TRIGGERS = "SET session_replication_role = replica; "

# Check name -> the SQL that breaks it (a plausible bug, written behind the services' back).
CORRUPTIONS: dict[str, str] = {
    "every transfer sums to zero":
        BEHIND_TRIGGERS + f"INSERT INTO postings (transfer_id, ledger_account_id, amount)"
        f" VALUES ((SELECT max(id) FROM transfers), {book(TENANT, 'available')}, 5)",
    "no negative balance outside the world book":
        "ALTER TABLE ledger_accounts DROP CONSTRAINT balance_not_negative;"
        + transfer("bogus", [(book(OWNER_2, "available"), -10**12), (WORLD, 10**12)]),
    "each balance equals the sum of its postings":
        f"UPDATE ledger_accounts SET balance = balance + 7 WHERE id = {book(TENANT, 'available')}",
    "all books together sum to zero":
        f"UPDATE ledger_accounts SET balance = balance + 7 WHERE id = {book(TENANT, 'available')}",
    "held funds equal what open orders and leases reserve":
        "UPDATE bids SET hold_amount = hold_amount + 1 WHERE client_order_id = 'low'",
    "no reservation without a held book covering it":
        BEHIND_TRIGGERS + f"DELETE FROM ledger_accounts WHERE id = {book(TENANT, 'held')}",
    "closed bids and closed leases hold nothing":
        "UPDATE bids SET hold_amount = 5 WHERE client_order_id = 'gone'",
    "no ended lease left unclosed past its close window":
        f"UPDATE leases SET closed = false WHERE id = {A100}",
    "billed GPU-seconds within the lease's GPUs times its duration":
        f"UPDATE leases SET billed_gpu_s = 1000, metered_gpu_s = 1000 WHERE id = {A100}",
    "billed amount within the rate allowed times the time billed":
        f"UPDATE leases SET billed_value = billed_value * 2, billed_amount = floor(billed_value * 2 / 3600)"
        f" WHERE id = {FIRM_2}",
    "billed amount is floor(billed value / 3600), nothing when free of charge":
        f"UPDATE leases SET billed_amount = billed_amount + 1 WHERE id = {FIRM}",
    # A settle transfer posted twice.
    "each lease's settlement postings match its billed and fee columns":
        f"WITH src AS (SELECT t.id FROM transfers t WHERE t.kind = 'settle' AND t.ref_id = {FIRM_2} LIMIT 1),"
        f" t AS (INSERT INTO transfers (kind, account_id, ref_type, ref_id, created_at)"
        f" SELECT kind, account_id, ref_type, ref_id, created_at FROM transfers WHERE id = (SELECT id FROM src)"
        f" RETURNING id)"
        f" INSERT INTO postings (transfer_id, ledger_account_id, amount)"
        f" SELECT (SELECT id FROM t), ledger_account_id, amount FROM postings WHERE transfer_id = (SELECT id FROM src)",
    # The owner's leg of a settlement paid to another owner.
    "a lease's settlement postings land only in its tenant's, its host owner's and the fees books":
        BEHIND_TRIGGERS + f"UPDATE postings SET ledger_account_id = {book(OWNER_2, 'available')}"
        f" WHERE ledger_account_id = {book(OWNER, 'available')} AND transfer_id IN"
        f" (SELECT id FROM transfers WHERE kind = 'settle' AND ref_id = {FIRM_2})",
    "each owner's balance equals its deposits plus what its hosts earned":
        transfer("bogus", [(book(OWNER, "available"), -1000), (book(TENANT, "available"), 1000)]),
    "the fees book equals the fees of all leases":
        transfer("bogus", [(FEES, -1), (WORLD, 1)]),
    "each tenant's available plus held equals its deposits less what its leases were billed":
        transfer("bogus", [(book(TENANT, "available"), -1000), (book(TENANT_B, "available"), 1000)]),
    # The schema refuses this shape too (leases_status_shape, migration 0007): the audit still looks.
    "an ending or ended lease has its end, never before its start nor after its planned end":
        BEHIND_TRIGGERS + "ALTER TABLE leases DROP CONSTRAINT IF EXISTS leases_status_shape;"
        f" UPDATE leases SET status = 'ending', end_reason = 'reclaimed' WHERE id = {FIRM_2}",
    # The active reclaim takes one GPU more than the leases left free.
    "leased and reclaimed GPUs within each host's present GPUs":
        "UPDATE reclaim_gpus SET gpus = gpus + 1 WHERE reclaim_id = (SELECT id FROM reclaims WHERE status = 'active')",
    "no two leases hold one GPU at the same time":
        f"UPDATE leases SET gpu_uuids = (SELECT gpu_uuids FROM leases WHERE id = {SPOT_1}) WHERE id = {FIRM}",
    "no live lease on a failed host":
        BEHIND_TRIGGERS + f"UPDATE leases SET status = 'active', end_reason = NULL, end_at = NULL, closed = false"
        f" WHERE id = {A100}",
    # h1 silent since 800 s, and a lease still started on it at 890 s.
    "no lease starts on a silent or failed host":
        f"UPDATE hosts SET health = 'silent', last_sample_at = '{(START + timedelta(seconds=800)).isoformat()}'"
        f" WHERE name = 'h1'",
    # The failed lease's bid asked to be requeued, and nothing put it back.
    "a preempted requeue bid whose leases are all closed is back in the book or says why not":
        "UPDATE bids SET requeue_on_preempt = true WHERE client_order_id = 'a100'",
    # Owner isolation (migration 0009). The requeued spot lease made a gang with a lease on the other
    # owner's host (as when fabrics were global by name).
    "no gang's leases span owners":
        f"UPDATE leases SET bid_id = (SELECT bid_id FROM leases WHERE id = {SPOT_2}),"
        f" tick_id = (SELECT tick_id FROM leases WHERE id = {SPOT_2}), host_id = {H2} WHERE id = {FIRM_2}",
    # The owner's reclaim ended a lease on the other owner's host.
    "a reclaim ends only its owner's leases":
        f"UPDATE leases SET host_id = {H2} WHERE id = {SPOT_1}",
    # A GPU under a live lease moved to another host.
    "no live lease holds a GPU registered to another host":
        f"UPDATE gpus SET host_id = {H2} WHERE uuid = (SELECT min(uuid) FROM lease_gpus WHERE lease_id = {FIRM_2})",
    # An energy reading near 2^63 stored as ingest did before it checked the meter bounds.
    "no stored meter sample breaks the meter bounds":
        "UPDATE meter_samples SET energy_mj = 9000000000000000000"
        " WHERE (uuid, ts) = (SELECT uuid, ts FROM meter_samples ORDER BY ts DESC, uuid LIMIT 1)",
    # Webhooks (migration 0011): a cursor past the account's last event.
    "a webhook's cursor is within its account's events":
        "INSERT INTO webhooks (account_id, url, events, secret, cursor_seq, created_at)"
        f" SELECT id, 'https://example.com/h', ARRAY['fill'], 'whsec_x', event_seq + 1, now() FROM accounts"
        f" WHERE id = {TENANT}",
    # A delivery of the tenant's first event under the wrong kind.
    "each webhook delivery of an event is its account's event, at or before the cursor":
        "WITH w AS (INSERT INTO webhooks (account_id, url, events, secret, cursor_seq, created_at)"
        f" SELECT id, 'https://example.com/h', ARRAY['fill', 'notice'], 'whsec_x', event_seq, now() FROM accounts"
        f" WHERE id = {TENANT} RETURNING id)"
        " INSERT INTO webhook_deliveries (webhook_id, seq, kind, body, created_at, next_attempt_at)"
        " SELECT w.id, 1, 'notice', '{}', now(), now() FROM w",
    # A ping delivered while the message queued before it is still pending.
    "a webhook's messages are delivered in order":
        "WITH w AS (INSERT INTO webhooks (account_id, url, events, secret, cursor_seq, created_at)"
        f" SELECT id, 'https://example.com/h', ARRAY['fill'], 'whsec_x', event_seq, now() FROM accounts"
        f" WHERE id = {TENANT} RETURNING id),"
        " first AS (INSERT INTO webhook_deliveries (webhook_id, seq, kind, body, created_at, next_attempt_at)"
        "   SELECT w.id, NULL, 'ping', '{}', now(), now() FROM w RETURNING webhook_id)"
        " INSERT INTO webhook_deliveries (webhook_id, seq, kind, body, created_at, delivered_at)"
        " SELECT webhook_id, NULL, 'ping', '{}', now(), now() FROM first",
}


def test_every_check_has_a_corruption() -> None:
    assert sorted(CORRUPTIONS) == sorted(check.name for check in CHECKS)


async def test_audit_passes_on_a_market_built_by_the_services(copy) -> None:
    conn, url = copy
    shape = await conn.fetchrow(
        "SELECT count(*) FILTER (WHERE status = 'active') AS active,"
        " count(*) FILTER (WHERE status = 'ending') AS ending, count(*) FILTER (WHERE status = 'ended') AS ended,"
        " count(*) FILTER (WHERE status = 'failed') AS failed,"
        " count(*) FILTER (WHERE free_of_charge) AS free, sum(fees_amount) AS fees FROM leases")
    assert dict(shape) == {"active": 1, "ending": 1, "ended": 2, "failed": 1, "free": 2, "fees": shape["fees"]}
    assert shape["fees"] > 0
    assert await conn.fetchval("SELECT count(*) FROM transfers WHERE kind = 'refund'") == 2

    breaches = await run_audit(conn, now=END, **SETTINGS)

    assert breaches == [], format_report(breaches)
    cli = run_audit_cli(url)
    assert cli.returncode == 0 and "passed" in cli.stdout, cli.stdout + cli.stderr


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
async def test_audit_names_each_broken_invariant(copy, name: str) -> None:
    conn, _ = copy
    await conn.execute(CORRUPTIONS[name])
    await conn.execute("RESET session_replication_role")

    breaches = dict(await run_audit(conn, now=END, **SETTINGS))

    assert name in breaches, format_report(list(breaches.items()))
    assert breaches[name]


async def test_the_close_window_runs_from_the_lease_end_by_the_given_clock(copy) -> None:
    # The failed lease stopped at 99 s, but its failure was found later (its lease_ended event): it
    # may stay unclosed for 30 s + two settlement intervals from then.
    conn, _ = copy
    await conn.execute(CORRUPTIONS["no ended lease left unclosed past its close window"])
    name = "no ended lease left unclosed past its close window"
    found = await conn.fetchval(
        f"SELECT max(at) FROM account_events WHERE lease_id = {A100} AND kind = 'lease_ended'")
    assert found > START + timedelta(seconds=99)
    deadline = found + timedelta(seconds=30 + 2 * 60)

    inside = dict(await run_audit(conn, now=deadline - timedelta(seconds=1), **SETTINGS))
    past = dict(await run_audit(conn, now=deadline + timedelta(seconds=1), **SETTINGS))
    tighter = dict(await run_audit(conn, now=deadline - timedelta(seconds=1), close_slack_s=0, **SETTINGS))

    assert name not in inside and name in past and name in tighter


async def test_cli_reports_the_breach_and_exits_1(copy) -> None:
    conn, url = copy
    await conn.execute(CORRUPTIONS["no two leases hold one GPU at the same time"])

    cli = run_audit_cli(url)

    assert cli.returncode == 1, cli.stdout + cli.stderr
    assert "FAILED" in cli.stdout and "- no two leases hold one GPU at the same time: 2 offending rows" in cli.stdout



async def test_time_billed_never_runs_past_the_given_clock(copy) -> None:
    # The last firm lease started at 890 s and was billed 60 s on 4 GPUs by 950 s: at 900 s it could
    # not have been. Without a clock, the database's own (which may lag an injected one) bounds nothing.
    conn, _ = copy
    name = "billed GPU-seconds within the lease's GPUs times its duration"

    early = dict(await run_audit(conn, now=START + timedelta(seconds=900), **SETTINGS))
    unbounded = dict(await run_audit(conn, **SETTINGS))

    assert name in early and name not in unbounded


async def test_gpus_falling_off_under_a_lease_and_a_reclaim_are_no_oversale(copy) -> None:
    # The agent reports h1 without one of the running firm lease's GPUs and without one of the idle
    # GPUs the active reclaim holds: 3 leased + 4 reclaimed on 6 present now, but nothing was sold
    # or reclaimed after that report, so nothing was oversold.
    conn, url = copy
    s = await Scenario.create(url)
    try:
        s.clock.now = END + timedelta(seconds=10)
        host_id, owner_id, leased = await conn.fetchrow(
            f"SELECT l.host_id, h.owner_id, l.gpu_uuids[1] FROM leases l JOIN hosts h ON h.id = l.host_id"
            f" WHERE l.id = {FIRM_2}")
        idle = await conn.fetchval("SELECT min(uuid) FROM gpus g WHERE host_id = $1 AND NOT EXISTS"
                                   " (SELECT 1 FROM lease_gpus lg WHERE lg.uuid = g.uuid AND lg.live)", host_id)
        kept = await conn.fetch("SELECT uuid, model, memory_mb FROM gpus WHERE host_id = $1"
                                " AND uuid <> ALL($2::text[]) ORDER BY idx", host_id, [leased, idle])
        await put_inventory(s.ctx, Principal(role="agent", account_id=owner_id, host_id=host_id), Inventory(gpus=[
            InventoryGpu(uuid=g["uuid"], model=g["model"], memory_mb=g["memory_mb"]) for g in kept]))
    finally:
        await s.close()

    breaches = await run_audit(conn, now=s.clock(), **SETTINGS)

    assert len(kept) == 6
    assert breaches == [], format_report(breaches)


async def test_a_reclaim_taking_a_lease_that_completes_within_its_notice_is_no_oversale(db_url: str) -> None:
    # A 2-minute spot lease on all 4 GPUs; the owner reclaims them at once. The lease would end
    # before a 120 s notice runs out, so it gets none and completes as planned, while the reclaim
    # already counts its GPUs: 4 leased + 4 reclaimed on 4 GPUs, and no oversale.
    s = await Scenario.create(db_url)
    try:
        await s.market(gpus=4)
        s.clock.advance(10)  # after the inventory report: the host is audited
        await s.bid(market="H100-80GB/spot", gpus=4, duration_s=120, limit="3.00")
        await s.tick()
        await create_reclaim(s.ctx, Principal(role="owner", account_id=s.owner_id),
                             ReclaimCreate(model="H100-80GB", gpus=4))
        async with s.ctx.pool.acquire() as conn:
            lease = await conn.fetchrow("SELECT status, reclaim_id FROM leases")
            breaches = await run_audit(conn, now=s.clock(), **SETTINGS)
    finally:
        await s.close()

    assert (lease["status"], lease["reclaim_id"]) == ("active", 1)  # untold, but tied to the reclaim
    assert breaches == [], format_report(breaches)


async def test_a_reclaim_of_leases_only_on_a_host_that_lost_a_gpu_is_no_oversale(db_url: str) -> None:
    # 6 GPUs: lease a (1 GPU, 1.00), lease b (3 GPUs, 2.00: a 6-GPU rival lost at 2.00), a reclaim of
    # the 2 idle ones; then an unleased GPU falls off the bus (5 left for 6 committed: the hardware,
    # not an oversale). A second reclaim of 1 GPU takes no idle GPU, only lease a (the cheapest):
    # it adds nothing, and must not make the host count as oversold (gpux sim seed 2433).
    s = await Scenario.create(db_url)
    try:
        await s.market(gpus=6)
        await s.bid(market="H100-80GB/spot", gpus=1, duration_s=3600, limit="3.00", coid="a")
        await s.tick()
        await s.bid(market="H100-80GB/spot", gpus=3, duration_s=3600, limit="3.00", coid="b")
        rival = await s.bid(market="H100-80GB/spot", gpus=6, duration_s=3600, limit="2.00", coid="rival")
        await s.tick()
        await cancel_bid(s.ctx, s.tenant_id, rival.id)
        prices = [r["price"] for r in await s.ctx.pool.fetch("SELECT price FROM leases ORDER BY id")]
        assert prices == [1_000_000, 2_000_000]
        the_owner = Principal(role="owner", account_id=s.owner_id)
        first = await create_reclaim(s.ctx, the_owner, ReclaimCreate(model="H100-80GB", gpus=2))
        assert first.taken_free == 2
        s.clock.advance(10)
        leased = {u for r in await s.ctx.pool.fetch("SELECT gpu_uuids FROM leases") for u in r["gpu_uuids"]}
        gone = next(u for u in s.uuids if u not in leased)
        await put_inventory(s.ctx, s.agent, Inventory(gpus=[
            InventoryGpu(uuid=u, model="H100-80GB", memory_mb=81559) for u in s.uuids if u != gone]))
        s.clock.advance(10)
        second = await create_reclaim(s.ctx, the_owner, ReclaimCreate(model="H100-80GB", gpus=1))
        async with s.ctx.pool.acquire() as conn:
            breaches = await run_audit(conn, now=s.clock(), **SETTINGS)
    finally:
        await s.close()

    assert (second.taken_free, [le.gpus for le in second.leases]) == (0, [1])
    assert breaches == [], format_report(breaches)
