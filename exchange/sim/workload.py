"""The simulation's workload: a seeded generator of steps (as TigerBeetle's workload). Every choice
comes from one `random.Random(seed)` and from what the simulation knows so far (`SimModel`, which
the driver keeps up to date from the services' answers), so a seed replayed on the same code gives
the same steps. Steps name entities by the simulation's own names (tenant index, host index, a
bid's client_order_id), never by database ids, so a printed step list reads on its own."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

START = datetime(2026, 5, 1, 12, 0, tzinfo=timezone.utc)
MODEL = "H100-80GB"
GPUS_PER_HOST = 8
FABRICS = ("pod-a", "pod-b")
TENANTS = 3
OWNERS = 2
FIRST_SHORT_OFFER_H = 1 / 3


@dataclass(frozen=True, slots=True)
class Step:
    kind: str
    args: tuple[tuple[str, object], ...] = ()

    def arg(self, name: str, default: object = None) -> object:
        for key, value in self.args:
            if key == name:
                return value
        return default

    def __str__(self) -> str:
        inner = " ".join(f"{k}={_short(v)}" for k, v in self.args)
        return f"{self.kind}({inner})" if inner else self.kind


def _short(value: object) -> str:
    if isinstance(value, datetime):
        return f"+{int((value - START).total_seconds())}s"
    return str(value)


def step(kind: str, **args: object) -> Step:
    return Step(kind, tuple(args.items()))


@dataclass
class AckedBid:
    """A bid the exchange acknowledged (placed, or returned on a retry)."""
    coid: str
    tenant: int
    body: dict
    bid_id: int
    status: str = "open"


@dataclass
class AgentState:
    """One host's agent: its report numbering, how far its samples go, reports not yet delivered."""
    next_seq: int = 1
    sampled_until: datetime = START
    held: list = field(default_factory=list)     # MeterReports generated, delivered later (late / out of order)
    last_sent: object = None                     # the last delivered report, for duplicates
    silent: bool = False
    energy_mj: int = 1_000_000


@dataclass
class HostState:
    name: str
    owner: int
    fabric: str
    uuids: list[str]
    present: list[bool]
    # Indices of GPUs that moved to another host (never restored here).
    moved_out: set[int] = field(default_factory=set)
    # Index -> when a GPU moved in from another host: it is sampled here only from then on.
    joined_at: dict[int, datetime] = field(default_factory=dict)
    host_id: int = 0
    offer_id: int | None = None                  # the live offer the simulation published last
    offer_until: datetime = START
    agent: AgentState = field(default_factory=AgentState)


@dataclass
class SimModel:
    """What the simulation knows: the world as it told the exchange, and what the exchange answered."""
    now: datetime = START
    tenant_ids: list[int] = field(default_factory=list)
    owner_ids: list[int] = field(default_factory=list)
    hosts: list[HostState] = field(default_factory=list)
    bids: dict[str, AckedBid] = field(default_factory=dict)      # by client_order_id
    deposits: dict[tuple[int, str], tuple[str, int]] = field(default_factory=dict)  # (tenant, key) -> (amount, id)
    reclaims: list[tuple[int, int]] = field(default_factory=list)  # (owner index, reclaim id)


class Workload:
    """Chooses the next step from the seed and the model."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.n_hosts = self.rng.randint(3, 6)
        self.fee_bps = self.rng.choice((0, 0, 30, 125, 250))
        self.bids_named = 0
        self.deposits_named = 0

    def setup(self) -> list[Step]:
        """The market the seed starts with: owners, tenants with funds, hosts with GPUs and offers."""
        steps = [step("account", role="owner", index=i) for i in range(OWNERS)]
        steps += [step("account", role="tenant", index=i) for i in range(TENANTS)]
        steps += [step("deposit", tenant=i, amount=self._money(100, 400), key=f"fund-{i}") for i in range(TENANTS)]
        for h in range(self.n_hosts):
            # Hosts alternate owners; fabrics are drawn, so some seeds have a fabric of one host only.
            fabric = FABRICS[0] if h < 2 else self.rng.choice(FABRICS)
            steps.append(step("host", host=h, owner=h % OWNERS, fabric=fabric))
            # The last host's first offer is short, so that every seed sees an offer expire (and its
            # host's leases end at the offer's end); the others last the whole seed.
            steps.append(self._offer_step(h, START, first=True, hours=FIRST_SHORT_OFFER_H if h == self.n_hosts - 1 else 48))
        return steps

    def next(self, model: SimModel) -> Step:
        rng = self.rng
        kinds = [("bid", 24), ("retry_bid", 3), ("conflict_bid", 1), ("cancel", 6), ("held_bid_tick", 2),
                 ("held_cancel_tick", 2), ("deposit", 2), ("retry_deposit", 1), ("offer_withdraw", 2),
                 ("offer_publish", 3), ("inventory", 2), ("gpu_fails", 0.25), ("move_gpu", 0.5), ("meter", 18), ("deliver_held", 3), ("host_silent", 1),
                 ("host_returns", 3), ("reclaim", 3), ("release", 2), ("tick", 14), ("settle", 5),
                 ("advance", 12), ("restart_leader", 1), ("race_bid", 2), ("race_deposit", 1),
                 ("race_settle", 1)]
        while True:
            kind = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
            made = getattr(self, "_" + kind)(model)
            if made is not None:
                return made

    # --- bids -------------------------------------------------------------------------------------

    def _bid_body(self, model: SimModel) -> dict:
        rng = self.rng
        tier = "spot" if rng.random() < 0.65 else "firm"
        multi_host = rng.random() < 0.12
        if multi_host:  # more than one host: several whole hosts of one fabric, bid high enough to win them
            gpus = rng.choice((12, 16, 16, 24))
        else:
            gpus = rng.choice((1, 1, 2, 2, 4, 4, 8, rng.randint(1, GPUS_PER_HOST)))
        body: dict = {"market": f"{MODEL}/{tier}", "gpus": gpus,
                      "duration_s": rng.choice((60, 120, 300, 600, 1800, 3600, 7200)),
                      "limit_price": self._money(3.0, 6.0) if multi_host else self._money(0.4, 5.0)}
        tif = rng.choices(("gtc", "ioc", "gtd"), weights=(70, 15, 15))[0]
        if tif == "gtd":
            body["expire_at"] = model.now + timedelta(seconds=rng.choice((5, 30, 120, 600, 1800)))
        else:
            body["time_in_force"] = tif
        if rng.random() < 0.3:
            body["requeue_on_preempt"] = True
        if rng.random() < 0.15:
            body["min_survival"] = rng.choice((0.5, 0.9, 0.99))
        if rng.random() < 0.15:
            body["min_notice_s"] = rng.choice((30, 120, 600))
        return body

    def _new_coid(self, model: SimModel, tenant: int) -> str:
        self.bids_named += 1
        return f"t{tenant}-b{self.bids_named}"

    def _bid(self, model: SimModel) -> Step:
        tenant = self.rng.randrange(TENANTS)
        return step("bid", tenant=tenant, coid=self._new_coid(model, tenant), **self._bid_body(model))

    def _acked(self, model: SimModel, *, open_only: bool = False) -> AckedBid | None:
        bids = [b for b in model.bids.values() if not open_only or b.status == "open"]
        return self.rng.choice(bids) if bids else None

    def _retry_bid(self, model: SimModel) -> Step | None:
        bid = self._acked(model)
        if bid is None:
            return None
        return step("bid", tenant=bid.tenant, coid=bid.coid, retry=True, **bid.body)

    def _conflict_bid(self, model: SimModel) -> Step | None:
        bid = self._acked(model)
        if bid is None:
            return None
        body = dict(bid.body, gpus=bid.body["gpus"] % GPUS_PER_HOST + 1)
        return step("bid", tenant=bid.tenant, coid=bid.coid, conflict=True, **body)

    def _cancel(self, model: SimModel) -> Step | None:
        # Mostly bids believed open; sometimes any (a cancel of a filled bid is refused).
        bid = self._acked(model, open_only=self.rng.random() < 0.8)
        return None if bid is None else step("cancel", tenant=bid.tenant, coid=bid.coid)

    def _race_bid(self, model: SimModel) -> Step:
        """The same new bid sent twice at once (a client retrying before the first answer came)."""
        tenant = self.rng.randrange(TENANTS)
        return step("race_bid", tenant=tenant, coid=self._new_coid(model, tenant), **self._bid_body(model))

    def _held_bid_tick(self, model: SimModel) -> Step:
        """A bid whose transaction stays open across a tick, committing after it: its change number
        is older than changes the tick loads."""
        tenant = self.rng.randrange(TENANTS)
        return step("held_bid_tick", tenant=tenant, coid=self._new_coid(model, tenant), **self._bid_body(model))

    def _held_cancel_tick(self, model: SimModel) -> Step | None:
        bid = self._acked(model, open_only=True)
        return None if bid is None else step("held_cancel_tick", tenant=bid.tenant, coid=bid.coid)

    # --- money ------------------------------------------------------------------------------------

    def _money(self, low: float, high: float) -> str:
        cents = self.rng.randint(int(low * 100), int(high * 100))
        return f"{cents // 100}.{cents % 100:02d}"

    def _deposit(self, model: SimModel) -> Step:
        self.deposits_named += 1
        return step("deposit", tenant=self.rng.randrange(TENANTS), amount=self._money(10, 300),
                    key=f"dep-{self.deposits_named}")

    def _race_deposit(self, model: SimModel) -> Step:
        self.deposits_named += 1
        return step("race_deposit", tenant=self.rng.randrange(TENANTS), amount=self._money(10, 100),
                    key=f"dep-{self.deposits_named}")

    def _retry_deposit(self, model: SimModel) -> Step | None:
        if not model.deposits:
            return None
        (tenant, key), (amount, _) = self.rng.choice(sorted(model.deposits.items()))
        if self.rng.random() < 0.3:  # the same key for another amount: refused
            return step("deposit", tenant=tenant, amount=amount + "1", key=key, conflict=True)
        return step("deposit", tenant=tenant, amount=amount, key=key, retry=True)

    # --- owners -----------------------------------------------------------------------------------

    def _offer_step(self, host: int, now: datetime, *, first: bool = False, hours: float = 48) -> Step:
        rng = self.rng
        # Short offers expire within a seed's horizon (the suite's seeds span one to a few hours).
        until = now + timedelta(hours=rng.choice((1 / 6, 0.5, 1, 4, 24, 48)) if not first else hours)
        args: dict = {"host": host, "gpus": rng.choice((GPUS_PER_HOST,) * 3 + (rng.randint(2, GPUS_PER_HOST),)),
                      "floor": self._money(0.3, 2.0), "until": until,
                      "notice_s": rng.choice((0, 30, 120, 600))}
        if rng.random() < 0.3:
            args["firm_until"] = now + (until - now) * rng.choice((0.25, 0.5, 1.0))
        if rng.random() < 0.2:
            args["rate_per_h"] = rng.choice((0.01, 0.1, 0.5))
        if not first and rng.random() < 0.15:
            args["from"] = now + timedelta(seconds=rng.choice((30, 300)))
        return step("offer_publish", **args)

    def _offer_withdraw(self, model: SimModel) -> Step | None:
        live = [i for i, h in enumerate(model.hosts) if h.offer_id is not None and h.offer_until > model.now]
        return step("offer_withdraw", host=self.rng.choice(live)) if live else None

    def _offer_publish(self, model: SimModel) -> Step:
        # Usually a host without a live offer (republish); sometimes one with (refused: overlap).
        bare = [i for i, h in enumerate(model.hosts) if h.offer_id is None or h.offer_until <= model.now]
        host = self.rng.choice(bare) if bare and self.rng.random() < 0.85 else self.rng.randrange(len(model.hosts))
        return self._offer_step(host, model.now)

    def _inventory(self, model: SimModel) -> Step:
        host = self.rng.randrange(len(model.hosts))
        state = model.hosts[host]
        gone = [i for i, p in enumerate(state.present) if not p and i not in state.moved_out]
        if gone and self.rng.random() < 0.6:
            return step("inventory", host=host, restore=self.rng.choice(gone))
        return step("inventory", host=host, drop=self.rng.randrange(len(state.uuids)))

    def _gpu_fails(self, model: SimModel) -> Step:
        """A GPU that a lease may be using disappears from its host's inventory."""
        host = self.rng.randrange(len(model.hosts))
        return step("inventory", host=host, drop=self.rng.randrange(GPUS_PER_HOST), leased=True)

    def _move_gpu(self, model: SimModel) -> Step | None:
        """A GPU its host dropped is put in another owner's host (the exchange takes it only once no
        live lease holds it, and refuses it while its host still has it)."""
        dropped = [(h, i) for h, state in enumerate(model.hosts) for i, p in enumerate(state.present)
                   if i not in state.moved_out and (not p or self.rng.random() < 0.05)]
        if not dropped:
            return None
        source, index = self.rng.choice(dropped)
        targets = [t for t, state in enumerate(model.hosts) if state.owner != model.hosts[source].owner]
        if not targets:
            return None
        return step("move_gpu", source=source, index=index, target=self.rng.choice(targets))

    # --- agents -----------------------------------------------------------------------------------

    def _speaking(self, model: SimModel) -> list[int]:
        return [i for i, h in enumerate(model.hosts) if not h.agent.silent]

    def _meter(self, model: SimModel) -> Step | None:
        hosts = self._speaking(model)
        if not hosts:
            return None
        mode = self.rng.choices(("in_order", "hold", "duplicate", "swap"), weights=(70, 10, 10, 10))[0]
        return step("meter", host=self.rng.choice(hosts), mode=mode, healthy=self.rng.random() < 0.95)

    def _deliver_held(self, model: SimModel) -> Step | None:
        hosts = [i for i, h in enumerate(model.hosts) if h.agent.held and not h.agent.silent]
        return step("deliver_held", host=self.rng.choice(hosts)) if hosts else None

    def _host_silent(self, model: SimModel) -> Step | None:
        hosts = self._speaking(model)
        return step("host_silent", host=self.rng.choice(hosts)) if len(hosts) > 1 else None

    def _host_returns(self, model: SimModel) -> Step | None:
        hosts = [i for i, h in enumerate(model.hosts) if h.agent.silent]
        if not hosts:
            return None
        # backfill: the agent kept sampling and its spool sends the outage late; else the host was down.
        return step("host_returns", host=self.rng.choice(hosts), backfill=self.rng.random() < 0.5)

    def _reclaim(self, model: SimModel) -> Step:
        rng = self.rng
        owner = rng.randrange(OWNERS)
        mine = [i for i, h in enumerate(model.hosts) if h.owner == owner]
        args: dict = {"owner": owner, "gpus": rng.choice((1, 2, 4, GPUS_PER_HOST, rng.randint(1, 12)))}
        if mine and rng.random() < 0.8:
            args["host"] = rng.choice(mine)
        at = None
        if rng.random() < 0.5:
            at = model.now + timedelta(seconds=rng.choice((10, 60, 300, 900)))
            args["at"] = at
        if rng.random() < 0.6:
            args["until"] = (at or model.now) + timedelta(seconds=rng.choice((60, 300, 1800)))
        return step("reclaim", **args)

    def _release(self, model: SimModel) -> Step | None:
        if not model.reclaims:
            return None
        return step("release", index=self.rng.randrange(len(model.reclaims)))

    # --- the exchange's own jobs ------------------------------------------------------------------

    def _tick(self, model: SimModel) -> Step:
        return step("tick")

    def _settle(self, model: SimModel) -> Step:
        return step("settle")

    def _race_settle(self, model: SimModel) -> Step:
        return step("race_settle")

    def _advance(self, model: SimModel) -> Step:
        # Now and then a long quiet stretch, so that leases of an hour or more complete within a seed.
        return step("advance", s=self.rng.choice((1, 2, 5, 15, 30, 60, 120, 300, 300, 900, 1800)))

    def _restart_leader(self, model: SimModel) -> Step:
        return step("restart_leader")
