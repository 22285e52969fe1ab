"""Builds market scenarios through the real services (no HTTP), on a manual clock."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone


from exchange.db.pool import create_pool

from exchange.accounts.schemas import AccountCreate, DepositCreate
from exchange.accounts.service import create_account, deposit
from exchange.auction.book_sync import BookSync
from exchange.auction.service import run_tick
from exchange.bids.schemas import BidCreate
from exchange.bids.service import place_bid
from exchange.core.auth import Principal
from exchange.core.clock import ManualClock
from exchange.core.context import AppContext
from exchange.core.settings import Settings
from exchange.hosts.schemas import HostCreate, Inventory, InventoryGpu
from exchange.hosts.service import create_host, put_inventory
from exchange.metering.schemas import MeterReport, MeterSample
from exchange.metering.service import ingest_report
from exchange.offers.schemas import OfferCreate
from exchange.offers.service import create_offer

START = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)


@dataclass
class Scenario:
    ctx: AppContext
    clock: ManualClock
    sync: BookSync
    owner_id: int = 0
    tenant_id: int = 0
    agent: Principal | None = None
    uuids: list[str] | None = None

    @classmethod
    async def create(cls, db_url: str, **settings: object) -> "Scenario":
        pool = await create_pool(db_url, min_size=1, max_size=4)
        clock = ManualClock(START)
        ctx = AppContext(settings=Settings.from_env({}, **settings), pool=pool, clock=clock)
        return cls(ctx=ctx, clock=clock, sync=BookSync())

    async def close(self) -> None:
        await self.ctx.pool.close()

    async def market(self, *, gpus: int = 8, floor: str = "1.00", firm_hours: float | None = None,
                     tenant_funds: str = "1000.00", model: str = "H100-80GB") -> None:
        owner = await create_account(self.ctx, AccountCreate(name="owner", role="owner"))
        self.owner_id = owner.id
        self.tenant_id = await self.new_tenant("tenant", tenant_funds)
        self.agent, self.uuids = await self.add_host("h1", gpus=gpus, floor=floor, firm_hours=firm_hours, model=model)

    async def new_tenant(self, name: str, funds: str = "1000.00") -> int:
        tenant = await create_account(self.ctx, AccountCreate(name=name, role="tenant"))
        await deposit(self.ctx, tenant.id, DepositCreate(amount=funds, idempotency_key="fund"))
        return tenant.id

    async def add_host(self, name: str, *, gpus: int = 8, floor: str = "1.00", firm_hours: float | None = None,
                       model: str = "H100-80GB", fabric: str = "pod-a", **offer: object) -> tuple[Principal, list[str]]:
        host = await create_host(self.ctx, self.owner_id, HostCreate(name=name, fabric=fabric))
        agent = Principal(role="agent", account_id=self.owner_id, host_id=host.id)
        uuids = [f"GPU-{host.id:04d}-{i:04d}-0000-0000" for i in range(gpus)]
        await put_inventory(self.ctx, agent, Inventory(gpus=[
            InventoryGpu(uuid=u, model=model, memory_mb=81559) for u in uuids]))
        await create_offer(self.ctx, Principal(role="owner", account_id=self.owner_id), OfferCreate(
            host_id=host.id, gpus=gpus, floor_price=floor, available_until=START + timedelta(days=2),
            firm_until=START + timedelta(hours=firm_hours) if firm_hours else None, **offer))
        return agent, uuids

    async def bid(self, *, market: str, gpus: int, duration_s: int, limit: str, coid: str = "b1",
                  tenant: int | None = None, **extra: object):
        bid, _ = await place_bid(self.ctx, tenant or self.tenant_id, BidCreate(
            market=market, gpus=gpus, duration_s=duration_s, limit_price=limit, client_order_id=coid, **extra))
        return bid

    async def tick(self):
        async with self.ctx.pool.acquire() as conn:
            return await run_tick(conn, self.sync, self.clock())

    async def report(self, seq: int, uuids: list[str], start: datetime, seconds: int, *, every: float = 1.0,
                     healthy: bool = True, agent: Principal | None = None, power_mw: int = 650_000):
        """`seconds` of samples every `every` s from `start`; each report's energy counter starts at 1 kJ
        (a reset, as far as the exchange can tell). 650 W suits an H100, not an A100 (bound 500 W)."""
        samples = [MeterSample(uuid=u, ts=start + timedelta(seconds=i * every), util=95, mem_used_mb=70_000,
                               power_mw=power_mw, energy_mj=1_000_000 + int(i * every * power_mw), temp_c=70,
                               healthy=healthy)
                   for i in range(int(seconds / every)) for u in uuids]
        return await ingest_report(self.ctx, agent or self.agent, MeterReport(seq=seq, samples=samples))

    async def balances(self, account_id: int) -> dict[str, int]:
        rows = await self.ctx.pool.fetch("SELECT kind, balance FROM ledger_accounts WHERE account_id = $1", account_id)
        return {r["kind"]: r["balance"] for r in rows}


def owner(s: Scenario) -> Principal:
    """The scenario's current owner, as the API would see it."""
    return Principal(role="owner", account_id=s.owner_id)
