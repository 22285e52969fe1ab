"""Issue 12, must-show 2: the typed Python client (exchange/client) against a real `gpux serve`:
typed round trips for every resource, and a create retried over a dropped connection acts once."""
from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta, timezone

import pytest

from exchange.accounts.schemas import AccountCreated, Balance, Deposit, LedgerEntry
from exchange.bids.schemas import Bid, BidCost, Quote
from exchange.client import AsyncClient, BadRequest, Client, Conflict, ConnectionFailed, Forbidden, NotFound
from exchange.hosts.schemas import AgentIdentity, Host, HostCreated, Inventory, InventoryGpu
from exchange.metering.schemas import MeterAck, MeterReport, MeterSample
from exchange.leases.schemas import Lease, OwnerLease
from exchange.markets.schemas import Book, CandleList, Market, RiskIndex, Ticker, TradeList
from exchange.offers.schemas import Offer
from exchange.reclaims.schemas import Reclaim
from exchange.webhooks.schemas import Delivery, Webhook
from tests.e2e.client import unique
from tests.support import ADMIN_KEY


def hours(n: float) -> datetime:
    return datetime.now(timezone.utc) + timedelta(hours=n)


async def eventually(predicate, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await predicate()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.1)


@pytest.fixture
async def root(server):
    async with AsyncClient(server.base_url, ADMIN_KEY) as api:
        yield api


async def new_account(root: AsyncClient, role: str, deposit: str | None = None) -> tuple[AccountCreated, AsyncClient]:
    created = await root.create_account(unique(role), role)  # type: ignore[arg-type]
    if deposit:
        await root.deposit(created.id, deposit)
    return created, AsyncClient(root.base_url, created.api_key)


async def new_host(root: AsyncClient, owner: AsyncClient, gpus: int, model: str) -> HostCreated:
    host = await owner.create_host(unique("host"), fabric=unique("pod"))
    async with AsyncClient(root.base_url, host.agent_token) as agent:
        inventory = Inventory(gpus=[InventoryGpu(uuid=f"GPU-{host.id:04d}-{i:04d}-{unique('u')}", model=model,
                                                 memory_mb=81559) for i in range(gpus)])
        assert isinstance(await agent.put_inventory(inventory), Host)
    return host


async def a_market(root: AsyncClient) -> str:
    """A spot market of a model of its own (a host's inventory makes it), with no offer in it."""
    _, owner = await new_account(root, "owner")
    async with owner:
        model = f"C{unique('gpu').replace('-', '')}-80GB"
        await new_host(root, owner, 1, model)
    return f"{model}/spot"


async def test_every_resource_round_trips_as_the_servers_structs(root: AsyncClient) -> None:
    # Arrange: an owner with a 4-GPU host of its own model, a funded tenant.
    owner_acct, owner = await new_account(root, "owner")
    tenant_acct, tenant = await new_account(root, "tenant")
    async with owner, tenant:
        model = f"C{unique('gpu').replace('-', '')}-80GB"
        market = f"{model}/spot"
        deposit = await root.deposit(tenant_acct.id, "100.00", idempotency_key=unique("dep"))
        host = await new_host(root, owner, 4, model)

        # Act + assert, resource by resource.
        assert isinstance(deposit, Deposit) and deposit.amount == "100.00"
        assert (await tenant.me()).id == tenant_acct.id
        assert await tenant.balance() == Balance(available="100.00", held="0.00")
        assert await root.balance(tenant_acct.id) == Balance(available="100.00", held="0.00")
        entries = [e async for e in tenant.ledger(page_size=1)]  # pages of one: the iterator follows cursors
        assert entries and all(isinstance(e, LedgerEntry) for e in entries)

        assert [h.id for h in await owner.hosts()] == [host.id]
        offer = await owner.create_offer(host.id, 4, "1.00", hours(2), reclaim_notice_s=60)
        assert isinstance(offer, Offer) and offer.status == "live" and offer.model == model
        assert [o.id for o in await owner.offers("live")] == [offer.id]

        quote = await tenant.quote(market, 2, 3600, "2.00")  # alone in the book: it would fill at the floor
        assert isinstance(quote, Quote) and (quote.would_fill, quote.price, quote.eligible_gpus) == (True, "1.00", 4)
        assert (quote.hold, quote.available) == ("4.00", "100.00")
        bid = await tenant.place_bid(market, 2, 3600, "2.00")
        assert isinstance(bid, Bid) and bid.client_order_id.startswith("cli-")
        filled = await eventually(lambda: _filled(tenant, bid.id))
        assert filled, "the bid did not fill"
        second = await tenant.place_bid(market, 1, 3600, "0.50")  # below the floor: rests open
        assert sorted([b.id async for b in tenant.bids(page_size=1)]) == sorted([second.id, bid.id])
        assert [b.id async for b in tenant.bids("open")] == [second.id]
        assert (await tenant.cancel_bid(second.id)).status == "cancelled"
        assert isinstance(await tenant.bid_cost(bid.id), BidCost)

        tenant_leases = [le async for le in tenant.leases()]
        owner_leases = [le async for le in owner.leases()]
        assert len(tenant_leases) == 1 and type(tenant_leases[0]) is Lease and tenant_leases[0].bid_id == bid.id
        assert [type(le) for le in owner_leases] == [OwnerLease] and owner_leases[0].id == tenant_leases[0].id
        assert type(await tenant.lease(tenant_leases[0].id)) is Lease
        assert type(await owner.lease(tenant_leases[0].id)) is OwnerLease

        reclaim = await owner.reclaim(model, 4, host_id=host.id)  # the 2 free GPUs, then the lease's 2
        assert isinstance(reclaim, Reclaim) and reclaim.idempotency_key and reclaim.taken_free == 2
        assert [le.id for le in reclaim.leases] == [tenant_leases[0].id]
        assert [r.id for r in await owner.reclaims()] == [reclaim.id]
        assert (await owner.get_reclaim(reclaim.id)).id == reclaim.id

        assert market in {m.id for m in await tenant.markets()} and all(
            isinstance(m, Market) for m in await tenant.markets())
        assert isinstance(await tenant.book(market), Book)
        ticker = await tenant.ticker(market)
        assert isinstance(ticker, Ticker) and ticker.last == "1.00"
        trades = await tenant.trades(market)
        assert isinstance(trades, TradeList) and [t.gpus for t in trades.items] == [2]
        candles = await tenant.candles(market, "1m")
        assert isinstance(candles, CandleList) and candles.items
        assert (await tenant.candles(market, "1m", start=hours(-1), end=hours(1))).items == candles.items
        assert isinstance(await tenant.risk(market), RiskIndex)

        hook = await tenant.create_webhook("http://127.0.0.1:9/hook", ["fill", "notice"])
        assert isinstance(hook, Webhook) and hook.secret
        assert [w.id for w in await tenant.webhooks()] == [hook.id]
        assert isinstance(await tenant.test_webhook(hook.id), Delivery)
        assert all(isinstance(d, Delivery) for d in await tenant.webhook_deliveries(hook.id))
        assert (await tenant.delete_webhook(hook.id)).id == hook.id

        assert (await owner.withdraw_offer(offer.id)).status == "withdrawn"


async def _filled(api: AsyncClient, bid_id: int) -> bool:
    return (await api.bid(bid_id)).status == "filled"


async def test_refusals_are_exceptions_with_code_field_and_message(root: AsyncClient) -> None:
    market = await a_market(root)
    _, tenant = await new_account(root, "tenant", deposit="10.00")
    async with tenant:
        with pytest.raises(BadRequest) as invalid:  # a body outside its bounds
            await tenant.place_bid(market, 0, 3600, "1.00")
        with pytest.raises(Forbidden) as forbidden:
            await tenant.create_host(unique("host"))
        with pytest.raises(NotFound) as missing:
            await tenant.bid(987_654_321)
        key = unique("same")
        await tenant.place_bid(market, 1, 3600, "0.01", client_order_id=key)
        with pytest.raises(Conflict) as conflict:  # the same key with other terms
            await tenant.place_bid(market, 1, 3600, "0.02", client_order_id=key)

    assert invalid.value.status == 400 and invalid.value.code == "invalid_field" and invalid.value.field == "gpus"
    assert "gpus" in invalid.value.message
    assert forbidden.value.status == 403 and forbidden.value.code
    assert missing.value.status == 404 and missing.value.code == "not_found"
    assert conflict.value.status == 409 and conflict.value.code


async def test_the_blocking_client_has_the_same_methods_and_iterators(server, root: AsyncClient) -> None:
    market = await a_market(root)
    created, tenant = await new_account(root, "tenant", deposit="5.00")
    await tenant.aclose()

    def blocking() -> tuple[Balance, list[LedgerEntry], list[Bid]]:
        with Client(server.base_url, created.api_key) as api:
            api.place_bid(market, 1, 600, "0.01")
            return api.balance(), list(api.ledger(page_size=1)), list(api.bids(page_size=1))

    balance, entries, bids = await asyncio.to_thread(blocking)

    assert isinstance(balance, Balance) and balance.held != "0.00"
    assert entries and all(isinstance(e, LedgerEntry) for e in entries)
    assert [type(b) for b in bids] == [Bid]


class Proxy:
    """A TCP proxy in front of the server, to break connections the way a network does.

    drops: for the first that many connections, forward the request, let the server answer, then
    close the client's side without passing the answer on (the request acted; the client saw a
    dropped connection). sever(): cut every open connection. refusing: close new connections at
    once (the server looks unreachable)."""

    def __init__(self, target_port: int, drops: int = 0) -> None:
        self.target_port = target_port
        self.drops = drops
        self.connections = 0
        self.refusing = False
        self.open: set[asyncio.StreamWriter] = set()
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def close(self) -> None:
        assert self.server is not None
        self.sever()
        self.server.close()

    def sever(self) -> None:
        for writer in list(self.open):
            writer.transport.abort()
        self.open.clear()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.refusing:
            client_w.transport.abort()
            return
        self.connections += 1
        drop = self.connections <= self.drops
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.open.update((client_w, server_w))

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while data := await reader.read(65536):
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        upstream = asyncio.create_task(pipe(client_r, server_w))
        if drop:
            await server_r.read(1)  # the server has answered, so it has acted
            client_w.close()
            server_w.close()
            upstream.cancel()
            return
        await pipe(server_r, client_w)
        upstream.cancel()


async def test_a_create_retried_over_a_dropped_connection_acts_once(server, root: AsyncClient) -> None:
    market = await a_market(root)
    created, unused = await new_account(root, "tenant", deposit="10.00")
    await unused.aclose()
    port = int(server.base_url.rsplit(":", 1)[1])
    proxy = Proxy(port, drops=1)
    url = await proxy.start()
    try:
        async with AsyncClient(url, created.api_key, backoff_s=0.01) as tenant:
            bid = await tenant.place_bid(market, 1, 3600, "0.01")
            attempts = tenant.attempts
            listed = [b async for b in tenant.bids()]
    finally:
        await proxy.close()

    assert attempts == 2 and proxy.connections >= 2  # the first answer was lost, the retry got one
    assert [b.id for b in listed] == [bid.id]  # one bid, not two
    assert listed[0].client_order_id == bid.client_order_id


async def test_a_create_without_a_key_is_not_resent_after_it_may_have_acted(server, root: AsyncClient) -> None:
    created, unused = await new_account(root, "owner")
    await unused.aclose()
    port = int(server.base_url.rsplit(":", 1)[1])
    proxy = Proxy(port, drops=1)
    url = await proxy.start()
    try:
        async with AsyncClient(url, created.api_key, backoff_s=0.01) as owner:
            with pytest.raises(ConnectionFailed):
                await owner.create_host(unique("host"))
            hosts = await owner.hosts()
    finally:
        await proxy.close()

    # A host has no idempotency key: resending could make two, so the client reports the failure
    # and the caller looks; the server made exactly one.
    assert len(hosts) == 1


async def test_the_stream_resumes_after_a_disconnect_with_no_event_lost(server, root: AsyncClient) -> None:
    # Arrange: a 2-GPU host offered with notice; a tenant whose stream goes through a proxy.
    _, owner = await new_account(root, "owner")
    created, direct = await new_account(root, "tenant", deposit="100.00")
    model = f"C{unique('gpu').replace('-', '')}-80GB"
    host = await new_host(root, owner, 2, model)
    await owner.create_offer(host.id, 2, "1.00", hours(2), reclaim_notice_s=90)
    proxy = Proxy(int(server.base_url.rsplit(":", 1)[1]))
    url = await proxy.start()
    seen: list = []
    try:
        async with AsyncClient(url, created.api_key, backoff_s=0.05) as tenant, owner, direct:
            events = tenant.stream()
            first = asyncio.ensure_future(anext(events))  # connects, then waits for the fill
            await eventually(lambda: _connected(proxy))
            await direct.place_bid(f"{model}/spot", 2, 3600, "2.00")
            seen.append(await asyncio.wait_for(first, 30))

            # Act: the connection drops and the server stays unreachable while the owner reclaims
            # (the notice is written while the tenant is away); then the network comes back.
            proxy.refusing = True
            proxy.sever()
            await owner.reclaim(model, 2, host_id=host.id)
            proxy.refusing = False
            async with asyncio.timeout(30):
                while "notice" not in {e.type for e in seen}:
                    seen.append(await anext(events))
            await events.aclose()
            # The history, without following: the stored events, then the iterator ends.
            history = [e async for e in direct.stream(0, follow=False)]
            after_all = [e async for e in direct.stream(history[-1].seq, follow=False)]
    finally:
        await proxy.close()

    # Assert: every event once, in order, seq rising by one, across the reconnect.
    assert [(e.type, e.seq) for e in seen] == [("fill", 1), ("lease_started", 2), ("notice", 3)]
    assert all(type(e.data) is Lease for e in seen) and seen[2].data.end_reason == "reclaimed"
    assert proxy.connections >= 2
    assert [(e.type, e.seq) for e in history][:3] == [("fill", 1), ("lease_started", 2), ("notice", 3)]
    assert after_all == []


async def _connected(proxy: Proxy) -> bool:
    return proxy.connections >= 1


async def test_the_agent_calls_round_trip(root: AsyncClient) -> None:
    _, owner = await new_account(root, "owner")
    async with owner:
        model = f"C{unique('gpu').replace('-', '')}-80GB"
        host = await new_host(root, owner, 1, model)
        offer = await owner.create_offer(host.id, 1, "1.00", hours(2))
        uuid = (await owner.host(host.id)).gpus[0].uuid
        async with AsyncClient(root.base_url, host.agent_token) as agent:
            me = await agent.agent_me()
            offers = await agent.agent_offers()
            leases = [le async for le in agent.agent_leases()]
            sample = MeterSample(uuid=uuid, ts=datetime.now(timezone.utc), util=50, mem_used_mb=1000,
                                 power_mw=300_000, energy_mj=1_000, temp_c=60, healthy=True)
            ack = await agent.meter(MeterReport(seq=1, samples=[sample]))
            again = await agent.meter(MeterReport(seq=1, samples=[sample]))

    assert isinstance(me, AgentIdentity) and me.host_id == host.id
    assert [o.id for o in offers] == [offer.id] and leases == []
    assert isinstance(ack, MeterAck) and ack.seq == 1 and not ack.duplicate
    assert again.duplicate  # a resent report (same seq) is harmless: why meter() is retried
