"""Benchmark of the matching engine (SPEC §7): `gpux bench matching`.

    from loadtests.bench_matching import run, format_table
    print(format_table(run()))                     # 1,000,000 orders on 100,000 hosts
    print(format_table(run(orders=20_000, hosts=2_000, welfare_instances=5)))   # quick

Figures:
* full_tick_ms: one tick of a fresh book holding every order (blocks and bids already loaded;
  loading is `build_ms`), the fastest of `repeats` fresh books (the machine is shared: the
  fastest run is the one least disturbed); orders_per_s = orders / full tick.
* incremental_tick_ms: the next tick after 1% of the orders changed (0.5% cancelled, 0.5% new),
  the median of `repeats` such ticks; `update_ms` is the time of those cancel/add calls.
* reference_*: the plain-Python reference (matching.reference) on the largest book it clears in
  about a minute, the engine on the same book, results checked equal (raises otherwise).
* welfare_*: the surplus per hour of the engine's allocation, sum of gpus x (limit - floor), as
  a share of the optimum of a MILP (scipy.optimize.milp) over the same small instance, with the
  rule's eligibility, gang rules and one uniform price per tier (see `milp_optimum`).  A tick
  allocates GPUs, a rate resource, and every price is per GPU-hour, so the surplus the
  allocation yields per hour is what the tick clears.  welfare_hours_* weights each fill by its
  duration too (gpus x hours x (limit - floor)): that optimum would give GPUs to a long bid at a
  lower price per GPU-hour over a short one at a higher price, which price priority (SPEC §4)
  forbids, so no rule that follows the SPEC comes near it; it is reported for completeness.

Nothing runs on import.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass

import numpy as np

from matching import INT64_MAX, ModelBook, Tier, reference_tick, warm_up
from matching.arrays import BID_FIELDS, BLOCK_FIELDS
from matching.testing import records_from_columns
from matching.units import hazard_budget_from_survival

NOW = 1_750_000_000
HOUR = 3600
CENT = 10_000  # micro-dollars

GANG_SIZES = np.array([1, 2, 3, 4, 6, 8, 16, 24, 32, 48, 64])
GANG_WEIGHTS = np.array([0.30, 0.18, 0.04, 0.14, 0.03, 0.12, 0.07, 0.03, 0.04, 0.02, 0.03])
DURATIONS_H = np.array([1, 2, 4, 6, 8, 12, 24, 48, 72])
DURATION_WEIGHTS = np.array([0.22, 0.18, 0.15, 0.1, 0.1, 0.08, 0.1, 0.04, 0.03])
SURVIVALS = [0.0, 0.5, 0.8, 0.9, 0.95, 0.99]
NOTICES = np.array([0, 30, 60, 120, 300])


@dataclass
class Market:
    """One model's book as columns: blocks, firm bids, spot bids, incumbents."""

    blocks: dict[str, np.ndarray]
    firm: dict[str, np.ndarray]
    spot: dict[str, np.ndarray]
    incumbents: dict[str, np.ndarray]

    @property
    def orders(self) -> int:
        return len(self.firm["bid_id"]) + len(self.spot["bid_id"])


def _choice(rng, values, weights, n):
    w = np.asarray(weights, float)
    return np.asarray(values)[rng.choice(len(values), size=n, p=w / w.sum())]


def make_blocks(rng: np.random.Generator, hosts: int, first_id: int = 1) -> dict[str, np.ndarray]:
    """Hosts of 8 GPUs in fabrics of 32-64 hosts.  Each fabric belongs to one owner and is
    published under that owner's policy (available window, firm window, notice, hazard), with
    per-host variation: 25% of hosts free for a shorter time, 15% offered as two blocks, 10% with
    running leases, 8% with an internal reservation ahead."""
    fabric_of_host = np.empty(hosts, np.int64)
    h, nfab = 0, 0
    while h < hosts:
        size = int(rng.integers(32, 65))
        fabric_of_host[h : h + size] = nfab
        h += size
        nfab += 1
    # Owner policy per fabric.
    f_avail = _choice(rng, [4, 8, 12, 24, 48, 72, 168], [1, 2, 2, 3, 3, 2, 2], nfab) * HOUR
    f_firm = np.where(rng.random(nfab) < 0.6, _choice(rng, [1, 2, 4, 8, 24, 72], [1] * 6, nfab) * HOUR, 0)
    f_notice = _choice(rng, [30, 60, 120, 300, 600], [1, 2, 5, 2, 1], nfab)
    f_rate = _choice(rng, [0, 20, 50, 100, 200, 500], [2, 3, 3, 2, 1, 1], nfab)
    f_price = np.exp(rng.normal(math.log(1.8), 0.15, nfab))

    split = rng.random(hosts) < 0.15
    first = np.where(split, _choice(rng, [2, 4, 6], [1, 2, 1], hosts), 8)
    host_of_block = np.concatenate([np.arange(hosts), np.flatnonzero(split)])
    gpus = np.concatenate([first, 8 - first[split]])
    n = len(gpus)
    order = np.argsort(host_of_block, kind="stable")
    host_of_block, gpus = host_of_block[order], gpus[order]
    fab = fabric_of_host[host_of_block]
    busy = rng.random(n) < 0.10
    free = np.where(busy, rng.integers(0, gpus + 1), gpus)
    floor = np.round(f_price[fab] * np.exp(rng.normal(0.0, 0.2, n)) * 100) * CENT
    short = rng.random(n) < 0.25
    window = np.where(short, np.minimum(f_avail[fab], _choice(rng, [1, 2, 4, 8], [1] * 4, n) * HOUR), f_avail[fab])
    avail = NOW + window
    firm = np.where(f_firm[fab] > 0, NOW + np.minimum(window, f_firm[fab]), 0)
    reserved = rng.random(n) < 0.08
    cut = np.where(reserved, NOW + _choice(rng, [1, 3, 6, 12, 24], [1] * 5, n) * HOUR, INT64_MAX)
    return {
        "block_id": np.arange(first_id, first_id + n, dtype=np.int64),
        "host_id": host_of_block.astype(np.int64) + 1,
        "fabric_id": fab + 1,
        "host_gpus": np.full(n, 8, np.int32),
        "gpus": gpus.astype(np.int32),
        "free": free.astype(np.int32),
        "floor": floor.astype(np.int64),
        "available_until": avail.astype(np.int64),
        "firm_until": firm.astype(np.int64),
        "notice_s": f_notice[fab].astype(np.int64),
        "rate_mph": f_rate[fab].astype(np.int64),
        "cut_at": cut.astype(np.int64),
    }


_BUDGETS = np.array([hazard_budget_from_survival(s) for s in SURVIVALS], dtype=np.int64)


def make_bids(rng: np.random.Generator, n: int, ids: np.ndarray, seqs: np.ndarray, spot: bool):
    """Gangs 1-64 weighted towards small, round durations, limits around $2/GPU-hour."""
    limit = np.maximum(1, np.round(np.exp(rng.normal(math.log(1.9), 0.35, n)) * 100)) * CENT
    return {
        "bid_id": ids.astype(np.int64),
        "seq": seqs.astype(np.int64),
        "gpus": _choice(rng, GANG_SIZES, GANG_WEIGHTS, n).astype(np.int32),
        "duration_s": (_choice(rng, DURATIONS_H, DURATION_WEIGHTS, n) * HOUR).astype(np.int64),
        "limit": limit.astype(np.int64),
        "hazard_budget": (
            _choice(rng, _BUDGETS, [3, 1, 1, 2, 1, 1], n) if spot else np.full(n, INT64_MAX)
        ).astype(np.int64),
        "min_notice_s": (_choice(rng, NOTICES, [3, 1, 2, 3, 1], n) if spot else np.zeros(n)).astype(
            np.int64
        ),
    }


def make_market(orders: int, hosts: int, seed: int) -> Market:
    rng = np.random.default_rng(seed)
    blocks = make_blocks(rng, hosts)
    n_firm = int(orders * 0.4)
    ids = rng.permutation(orders * 4)[:orders].astype(np.int64) + 1  # id order != priority order
    seqs = rng.permutation(orders).astype(np.int64) + 1
    firm = make_bids(rng, n_firm, ids[:n_firm], seqs[:n_firm], spot=False)
    spot = make_bids(rng, orders - n_firm, ids[n_firm:], seqs[n_firm:], spot=True)
    n_inc = max(1, orders // 100)
    incumbents = {
        "lease_id": np.arange(1, n_inc + 1, dtype=np.int64),
        "limit": (np.round(np.exp(rng.normal(math.log(1.9), 0.35, n_inc)) * 100) * CENT).astype(np.int64),
    }
    return Market(blocks, firm, spot, incumbents)


def load_book(m: Market) -> ModelBook:
    book = ModelBook()
    book.upsert_blocks(*(m.blocks[name] for name, _ in BLOCK_FIELDS))
    book.add_bids(Tier.FIRM, *(m.firm[name] for name, _ in BID_FIELDS))
    book.add_bids(Tier.SPOT, *(m.spot[name] for name, _ in BID_FIELDS))
    book.set_incumbents(m.incumbents["lease_id"], m.incumbents["limit"])
    return book


def _ms(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000.0


# ---------------------------------------------------------------------------------------------
# engine timings


def time_engine(orders: int, hosts: int, seed: int, repeats: int = 5) -> dict:
    market = make_market(orders, hosts, seed)
    full, build = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        book = load_book(market)
        build.append(_ms(t0))
        t0 = time.perf_counter()
        first = book.tick(NOW)
        full.append(_ms(t0))
    # Incremental: from the state after the first tick, cancel 0.5% and add 0.5%, tick again.
    rng = np.random.default_rng(seed + 1)
    incr, update = [], []
    next_id = int(max(market.firm["bid_id"].max(), market.spot["bid_id"].max())) + 1
    next_seq = orders + 1
    now = NOW
    for _ in range(repeats):
        now += 2
        n_change = max(1, orders // 200)
        t0 = time.perf_counter()
        for tier, cols in ((Tier.FIRM, market.firm), (Tier.SPOT, market.spot)):
            share = n_change * len(cols["bid_id"]) // orders
            book.remove_bids(tier, rng.choice(cols["bid_id"], share, replace=False))
            fresh = make_bids(rng, share, np.arange(next_id, next_id + share),
                              np.arange(next_seq, next_seq + share), spot=tier == Tier.SPOT)
            next_id += share
            next_seq += share
            book.add_bids(tier, *(fresh[name] for name, _ in BID_FIELDS))
        update.append(_ms(t0))
        t0 = time.perf_counter()
        book.tick(now)
        incr.append(_ms(t0))
    return {
        "orders": orders,
        "hosts": hosts,
        "blocks": len(market.blocks["block_id"]),
        "build_ms": min(build),
        "full_tick_ms": min(full),
        "orders_per_s": orders / (min(full) / 1000.0),
        "incremental_tick_ms": float(np.median(incr)),
        "update_ms": float(np.median(update)),
        "fills_first_tick": int(len(first.firm.fill_bid_id) + len(first.spot.fill_bid_id)),
        "price_firm": first.firm.price,
        "price_spot": first.spot.price,
    }


# ---------------------------------------------------------------------------------------------
# reference comparison


def compare_reference(seed: int, budget_s: float = 60.0, sizes=(1_000, 2_000, 5_000, 10_000, 20_000, 50_000)) -> dict:
    """Grow the book until the reference would exceed the budget; on each size check the engine
    equals the reference (raise otherwise).  Report the largest size done."""
    done = None
    spent = 0.0
    for orders in sizes:
        if done is not None:
            # The reference grows about quadratically: stop when the next size would not fit.
            estimate = done["reference_ms"] / 1000.0 * (orders / done["reference_orders"]) ** 2
            if spent + estimate > budget_s:
                break
        hosts = max(10, orders // 10)
        market = make_market(orders, hosts, seed)
        blocks = records_from_columns(market.blocks)
        firm = records_from_columns(market.firm)
        spot = records_from_columns(market.spot)
        inc = records_from_columns(market.incumbents)
        t0 = time.perf_counter()
        ref = reference_tick(blocks, firm, spot, inc, NOW)
        ref_ms = _ms(t0)
        spent += ref_ms / 1000.0
        engine_ms = []
        for _ in range(3):
            book = load_book(market)
            t0 = time.perf_counter()
            res = book.tick(NOW)
            engine_ms.append(_ms(t0))
        for name in ("firm", "spot"):
            if getattr(res, name).as_dict() != getattr(ref, name):
                raise AssertionError(f"engine and reference differ on {orders} orders ({name})")
        free_after = dict(zip(book.blocks()["block_id"].tolist(), book.blocks()["free"].tolist(), strict=True))
        if free_after != ref.free_after:
            raise AssertionError(f"engine and reference leave different free counts ({orders} orders)")
        done = {"reference_orders": orders, "reference_ms": ref_ms, "engine_ms_same_book": min(engine_ms)}
    done["reference_ratio"] = done["reference_ms"] / max(done["engine_ms_same_book"], 1e-6)
    return done


# ---------------------------------------------------------------------------------------------
# welfare against a MILP optimum


def _welfare_of_fills(market: Market, result, per_hour: bool = False) -> float:
    blocks = market.blocks
    floor_of = dict(zip(blocks["block_id"].tolist(), blocks["floor"].tolist(), strict=True))
    total = 0.0
    for cols, res in ((market.firm, result.firm), (market.spot, result.spot)):
        lim = dict(zip(cols["bid_id"].tolist(), cols["limit"].tolist(), strict=True))
        dur = dict(zip(cols["bid_id"].tolist(), cols["duration_s"].tolist(), strict=True))
        for b, k, g in zip(res.fill_bid_id.tolist(), res.fill_block_id.tolist(), res.fill_gpus.tolist(), strict=True):
            hours = 1.0 if per_hour else dur[b] / HOUR
            total += g * hours * (lim[b] - floor_of[k]) / 1e6
    return total


def _eligible_matrix(market: Market, cols, tier: Tier) -> np.ndarray:
    """eligible[b, k]: the rule's eligibility of bid b on block k, floor included."""
    k = market.blocks
    end = NOW + cols["duration_s"][:, None]
    ok = (end <= k["available_until"][None, :]) & (k["floor"][None, :] <= cols["limit"][:, None])
    if tier == Tier.FIRM:
        return ok & (k["firm_until"][None, :] >= end)
    exposure = np.maximum(0, end - np.maximum(NOW, k["firm_until"])[None, :])
    survives = k["rate_mph"][None, :].astype(object) * exposure.astype(object) <= cols["hazard_budget"][:, None].astype(object)
    return (ok & (end <= k["cut_at"][None, :]) & (k["notice_s"][None, :] >= cols["min_notice_s"][:, None])
            & survives.astype(bool))


@contextlib.contextmanager
def _native_stdout_silenced():
    """HiGHS (under scipy's milp) sometimes prints debug lines from C++ straight to file
    descriptor 1, whatever its options; `--json` must print one JSON object and nothing else."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def milp_optimum(market: Market, time_limit: float = 20.0, per_hour: bool = True,
                 uniform_price: bool = True) -> float:
    """The welfare of the best feasible assignment of the same problem the rule solves, solved
    exactly by scipy.optimize.milp: the same eligibility (floor <= limit included); a single-host
    gang (gpus <= the largest host) on one block with enough free GPUs; a multi-host gang on whole
    hosts (free == gpus == host_gpus) of one fabric, every host it uses given entirely except at
    most one (the rule's "the last one gives only what is still needed"), and no host used by two
    multi-host gangs (the second would not find it whole); with `uniform_price`, one price per
    tier that no winner's limit is below and no used block's floor is above (the SPEC's market:
    one clearing price per market, no winner above its limit, no owner below its floor).  What
    it leaves out of the rule: price-time priority and best fit, so this is the welfare an
    omniscient planner would reach in the same market.  `per_hour`: value a fill at
    gpus x (limit - floor), its surplus per hour; else x its hours too."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import coo_matrix

    k = market.blocks
    max_host = int(k["host_gpus"].max())
    whole_free = (k["free"] == k["gpus"]) & (k["gpus"] == k["host_gpus"])
    fabrics = np.unique(k["fabric_id"])
    var_cost, hi = [], []
    rows, cols_, vals = [], [], []
    rhs_lo, rhs_hi = [], []
    cap_rows: dict[int, int] = {}  # block -> row: GPUs given <= free
    host_rows: dict[int, int] = {}  # block -> row: multi-host gangs using it <= 1
    use_rows: dict[tuple[int, int], int] = {}  # (tier, block) -> row: GPUs given <= free x used
    price_var: dict[int, int] = {}
    top = float(max(market.firm["limit"].max(initial=0), market.spot["limit"].max(initial=0), k["floor"].max(initial=0)))

    def new_var(cost, upper):
        var_cost.append(-cost)
        hi.append(upper)
        return len(var_cost) - 1

    def new_row(lo_, hi_):
        rhs_lo.append(lo_)
        rhs_hi.append(hi_)
        return len(rhs_lo) - 1

    def put(r, v, x):
        rows.append(r)
        cols_.append(v)
        vals.append(float(x))

    def cap_row(j):
        if j not in cap_rows:
            cap_rows[j] = new_row(-np.inf, float(k["free"][j]))
        return cap_rows[j]

    def host_row(j):
        if j not in host_rows:
            host_rows[j] = new_row(-np.inf, 1.0)
        return host_rows[j]

    def use_row(t, j):
        # u = "block j sells in tier t"; the tier's uniform price is at least its floor.
        if (t, j) not in use_rows:
            r = new_row(-np.inf, 0.0)
            u = new_var(0.0, 1)
            put(r, u, -float(k["free"][j]))
            use_rows[(t, j)] = r
            fl = new_row(-np.inf, 0.0)  # floor_j * u - p_t <= 0
            put(fl, u, float(k["floor"][j]))
            put(fl, price_var[t], -1)
        return use_rows[(t, j)]

    def win_price(t, b_vars, limit):
        # p_t <= limit + top * (1 - sum(b_vars))
        r = new_row(-np.inf, float(limit) + top)
        put(r, price_var[t], 1)
        for v in b_vars:
            put(r, v, top)

    for tier, cols in ((Tier.FIRM, market.firm), (Tier.SPOT, market.spot)):
        elig = _eligible_matrix(market, cols, tier)
        t = int(tier)
        if uniform_price:
            price_var[t] = new_var(0.0, top)
        for b in range(len(cols["bid_id"])):
            g = int(cols["gpus"][b])
            hours = 1.0 if per_hour else cols["duration_s"][b] / HOUR
            per_gpu = lambda j: hours * (cols["limit"][b] - k["floor"][j]) / 1e6  # noqa: E731
            if g <= max_host:
                blocks = np.flatnonzero(elig[b] & (k["free"] >= g))
                if not len(blocks):
                    continue
                one = new_row(-np.inf, 1.0)
                vs = []
                for j in blocks:
                    v = new_var(g * per_gpu(j), 1)
                    vs.append(v)
                    put(one, v, 1)
                    put(cap_row(j), v, g)
                    if uniform_price:
                        put(use_row(t, j), v, g)
                if uniform_price:
                    win_price(t, vs, cols["limit"][b])
                continue
            one = None
            ys = []
            for fab in fabrics:
                blocks = np.flatnonzero(elig[b] & whole_free & (k["fabric_id"] == fab))
                if k["gpus"][blocks].sum() < g:
                    continue
                if one is None:
                    one = new_row(-np.inf, 1.0)
                y = new_var(0.0, 1)  # the gang lands in this fabric
                ys.append(y)
                put(one, y, 1)
                gang = new_row(0.0, 0.0)  # sum of q == g * y
                put(gang, y, -g)
                partial = new_row(-np.inf, 1.0)  # at most one host given in part
                for j in blocks:
                    size = float(k["gpus"][j])
                    q = new_var(per_gpu(j), size)  # GPUs of host j given to the gang
                    z = new_var(0.0, 1)  # host j used by the gang
                    p = new_var(0.0, 1)  # host j given in part
                    put(gang, q, 1)
                    put(cap_row(j), q, 1)
                    if uniform_price:
                        put(use_row(t, j), q, 1)
                    put(host_row(j), z, 1)
                    link = new_row(-np.inf, 0.0)  # q <= size * z
                    put(link, q, 1)
                    put(link, z, -size)
                    whole = new_row(-np.inf, 0.0)  # q >= size * (z - p)
                    put(whole, q, -1)
                    put(whole, z, size)
                    put(whole, p, -size)
                    put(partial, p, 1)
                    zy = new_row(-np.inf, 0.0)  # z <= y
                    put(zy, z, 1)
                    put(zy, y, -1)
            if uniform_price and ys:
                win_price(t, ys, cols["limit"][b])
    if not var_cost:
        return 0.0
    a = coo_matrix((vals, (rows, cols_)), shape=(len(rhs_lo), len(var_cost))).tocsr()
    integrality = np.ones(len(var_cost))
    integrality[list(price_var.values())] = 0  # the prices are continuous
    with _native_stdout_silenced():
        res = milp(
            c=np.array(var_cost),
            constraints=LinearConstraint(a, np.array(rhs_lo), np.array(rhs_hi)),
            integrality=integrality,
            bounds=Bounds(np.zeros(len(var_cost)), np.array(hi, float)),
            options={"time_limit": time_limit, "mip_rel_gap": 1e-6},
        )
    if res.x is None:
        raise RuntimeError(f"MILP failed: {res.message}")
    bound = getattr(res, "mip_dual_bound", None)
    if res.status != 0 and bound is not None and np.isfinite(bound):
        return -float(bound)  # not proven optimal in time: use the bound (conservative share)
    return -float(res.fun)


def welfare(instances: int, seed: int) -> dict:
    shares: dict[bool, list[float]] = {True: [], False: []}  # per_hour -> shares
    for i in range(instances):
        rng = np.random.default_rng(seed * 1000 + i)
        hosts = int(rng.integers(15, 45))
        orders = int(rng.integers(60, 201))
        m = make_market(orders, hosts, seed * 1000 + i)
        result = load_book(m).tick(NOW)
        for per_hour, out in shares.items():
            engine = _welfare_of_fills(m, result, per_hour=per_hour)
            best = milp_optimum(m, per_hour=per_hour)
            out.append(1.0 if best <= 1e-9 else engine / best)

    def stat(values, f):
        return float(f(values)) if values else float("nan")

    return {
        "welfare_instances": instances,
        "welfare_mean": stat(shares[True], np.mean),
        "welfare_worst": stat(shares[True], np.min),
        "welfare_hours_mean": stat(shares[False], np.mean),
        "welfare_hours_worst": stat(shares[False], np.min),
    }


# ---------------------------------------------------------------------------------------------


def run(
    orders: int = 1_000_000,
    hosts: int = 100_000,
    seed: int = 1,
    *,
    welfare_instances: int = 50,
    reference_budget_s: float = 60.0,
    reference_sizes: tuple[int, ...] = (1_000, 2_000, 5_000, 10_000, 20_000, 50_000),
    repeats: int = 5,
) -> dict:
    """Run every measurement and return the figures (see the module docstring)."""
    t0 = time.perf_counter()
    warm_up()
    figures: dict = {"warm_up_ms": _ms(t0)}
    figures.update(time_engine(orders, hosts, seed, repeats=repeats))
    figures.update(compare_reference(seed, budget_s=reference_budget_s, sizes=reference_sizes))
    figures.update(welfare(welfare_instances, seed))
    return figures


def format_table(figures: dict) -> str:
    rows = [
        ("book", f"{figures['orders']:,} orders, {figures['hosts']:,} hosts, {figures['blocks']:,} blocks"),
        ("load book (upsert + add)", f"{figures['build_ms']:.1f} ms"),
        ("full tick", f"{figures['full_tick_ms']:.1f} ms  (target <= 300)"),
        ("orders/s (full tick)", f"{figures['orders_per_s']:,.0f}"),
        ("incremental tick (1% changed)", f"{figures['incremental_tick_ms']:.1f} ms  (target <= 30)"),
        ("  cancel + add calls", f"{figures['update_ms']:.1f} ms"),
        ("reference book", f"{figures['reference_orders']:,} orders"),
        ("  reference tick", f"{figures['reference_ms']:.1f} ms"),
        ("  engine tick, same book", f"{figures['engine_ms_same_book']:.2f} ms"),
        ("  engine / reference speed", f"{figures['reference_ratio']:,.0f}x  (target >= 50x, results equal)"),
        ("welfare vs MILP optimum", f"mean {figures['welfare_mean']:.1%}, worst {figures['welfare_worst']:.1%} "
                                    f"over {figures['welfare_instances']} instances  (target mean >= 95%; "
                                    f"surplus per hour)"),
        ("  same, weighted by hours", f"mean {figures['welfare_hours_mean']:.1%}, worst "
                                     f"{figures['welfare_hours_worst']:.1%}  (gpus x hours x (limit - floor))"),
        ("warm-up (compile/load kernels)", f"{figures['warm_up_ms']:.0f} ms"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)
