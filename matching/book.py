"""The stateful order book of one GPU model: blocks (supply), firm and spot bids, incumbents.

The book is kept between ticks so that a tick costs what changed:

* Blocks live in a `BlockTable` (sorted by block_id); a `BlockIndex` (floor-sorted rows, segment
  trees, fabric lists) is derived from it and only rebuilt when blocks change.  Allocation updates
  the index in place, and `free` is written back to the table after each tick.
* Both tiers' bids live in one `BidBook` (one price-time priority walk clears both): a main run
  sorted by (limit desc, seq asc, tier), plus a small pending run of recent additions with the
  same layout; ticks merge the two on the fly.  Cancels and fills only flip a state byte; both
  runs are compacted into one now and then.  Inside, a bid is known by `bid_id * 2 + tier` and
  ordered by `seq * 2 + tier`, so the two tiers may reuse ids and sequence numbers.
* Bids of a tier with equal (duration, notice, survival budget, gpus) share a class id, and
  per-class answers ("structurally eligible?", "nothing fits any more") are cached for one tick.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np

from matching import kernels as K
from matching.arrays import (
    BID_FIELDS,
    BLOCK_FIELDS,
    INT64_MAX,
    BlockTable,
    Tier,
    as_columns,
    validate_bids,
)

_BIT = K.bit_table()
_GE, _LE = K.mask_tables()
_EMPTY_I64 = np.empty(0, dtype=np.int64)
# Window thresholds of the multi-host bounds (kernels, multi-host gangs): at most this many per
# tier, and fewer when the bounds would exceed _WLB_ENTRIES entries (x 8 bytes).
_MAX_THRESHOLDS = 4
_WLB_ENTRIES = 1 << 23


@dataclass(frozen=True)
class TickResult:
    """One tier's outcome of a tick (docs/matching.md)."""

    fill_bid_id: np.ndarray  # int64, one row per (bid, block) in allocation order
    fill_block_id: np.ndarray  # int64
    fill_gpus: np.ndarray  # int32
    price: int  # -1 when nothing traded
    indicative: int  # == price when something traded
    # Highest limit among this tier's losing, structurally eligible bids (-1 when none): the
    # competing bid that outbids incumbents below it, and the most they pay when nothing trades.
    competing_limit: int
    loser_bid_id: np.ndarray  # int64, ascending
    loser_reason: np.ndarray  # int8, matching.reasons.Reason values
    loser_shortfall: np.ndarray  # int64, > 0 only for LIMIT_BELOW_PRICE
    outbid_lease_id: np.ndarray  # int64, ascending; always empty for firm
    state_hash: int  # uint64 value

    def as_dict(self) -> dict:
        """Plain Python values, in the shape `matching.reference.reference_tick` returns."""
        return {
            "fills": list(
                zip(
                    self.fill_bid_id.tolist(),
                    self.fill_block_id.tolist(),
                    self.fill_gpus.tolist(),
                    strict=True,
                )
            ),
            "price": int(self.price),
            "indicative": int(self.indicative),
            "competing_limit": int(self.competing_limit),
            "losers": list(
                zip(
                    self.loser_bid_id.tolist(),
                    self.loser_reason.tolist(),
                    self.loser_shortfall.tolist(),
                    strict=True,
                )
            ),
            "outbid": self.outbid_lease_id.tolist(),
            "state_hash": int(self.state_hash),
        }


@dataclass(frozen=True)
class ModelTickResult:
    firm: TickResult
    spot: TickResult


def reclaim_profiles(notice: np.ndarray, rate: np.ndarray):
    """Group blocks by reclaim profile (notice_s, rate_mph), at most 64 groups, so that a tree
    node can say which profiles lie under it in one int64 bitset.  Owners choose these from few
    values; with more than 64 distinct pairs, neighbouring pairs share a group whose
    representative (largest notice, smallest rate) is an optimistic bound for all its members.
    Returns (bit of each block, representative notice per group, representative rate per group).
    """
    order = np.lexsort((rate, notice))
    new_pair = np.ones(len(order), bool)
    new_pair[1:] = (np.diff(notice[order]) != 0) | (np.diff(rate[order]) != 0)
    pid = np.empty(len(order), np.int64)
    pid[order] = np.cumsum(new_pair) - 1
    firsts = order[new_pair]
    pairs = np.stack([notice[firsts], rate[firsts]], axis=1)
    if len(pairs) > 64:
        group = (np.arange(len(pairs)) * 64) // len(pairs)
        pid = group[pid]
        rep_notice = np.full(64, np.iinfo(np.int64).min, np.int64)
        rep_rate = np.full(64, np.iinfo(np.int64).max, np.int64)
        np.maximum.at(rep_notice, group, pairs[:, 0])
        np.minimum.at(rep_rate, group, pairs[:, 1])
    else:
        rep_notice = pairs[:, 0].astype(np.int64)
        rep_rate = pairs[:, 1].astype(np.int64)
    bits = K.bit_table()[pid] if len(pid) else np.empty(0, np.int64)
    return bits, np.ascontiguousarray(rep_notice), np.ascontiguousarray(rep_rate)


def rows_empty(n: int, width: int) -> np.ndarray:
    """An (n, width) int64 array whose rows start on 64-byte boundaries.  numpy places large
    arrays 16 bytes into a page, so a 64-byte tree node would straddle two cache lines and every
    node a search visits would cost two misses instead of one."""
    size = n * width * 8
    raw = np.empty(size + 64, np.uint8)
    start = -raw.ctypes.data % 64
    return raw[start: start + size].view(np.int64).reshape(n, width)


def _floor_order(floor: np.ndarray) -> np.ndarray:
    """Table rows in (floor, row) order: the table is sorted by block_id, so this is (floor,
    block_id).  One quick sort of floor * n + row when that fits in int64 (a quarter of the time
    of numpy's stable sort on a large book), else the stable sort."""
    n = len(floor)
    if n and int(floor.max()) < np.iinfo(np.int64).max // n - 1:
        return np.argsort(floor * n + np.arange(n, dtype=np.int64))
    return np.argsort(floor, kind="stable")


def _stable_small_order(keys: np.ndarray, bound: int) -> np.ndarray:
    """Stable argsort of non-negative keys below `bound`: numpy sorts 16-bit keys by radix."""
    if bound <= np.iinfo(np.uint16).max:
        return np.argsort(keys.astype(np.uint16), kind="stable")
    return np.argsort(keys, kind="stable")


def _fabric_order(fabric_ids, fab_of_row, pbit, c):
    """Dense fabric indices in (firm reach, reclaim profile, fabric_id) order rather than fabric_id
    order, so that the subtrees of the fabric trees hold fabrics alike: their aggregates and
    bounds then prune a multi-host search early (ties still go to the lowest fabric_id, through
    BlockIndex.fid).  Measured on the benchmark book, reach first beat profile first.  Returns
    (fabric_id of each dense index, dense index of each block)."""
    nfab = len(fabric_ids)
    if nfab == 0:
        return fabric_ids, fab_of_row
    profile = np.zeros(nfab, np.int64)
    np.maximum.at(profile, fab_of_row, np.log2(pbit.view(np.uint64).astype(np.float64)).astype(np.int64))
    reach = np.zeros(nfab, np.int64)
    np.maximum.at(reach, fab_of_row, np.minimum(c["available_until"], c["firm_until"]))
    order = np.lexsort((fabric_ids, profile, reach))
    dense = np.empty(nfab, np.int64)
    dense[order] = np.arange(nfab)
    return fabric_ids[order], dense[fab_of_row]


class BlockIndex:
    """Floor-sorted copy of the blocks with the search structures the kernels use."""

    def __init__(self, table: BlockTable, rows: np.ndarray | None = None) -> None:
        c = table.cols
        n = len(table)
        if rows is None:
            rows = _floor_order(c["floor"])
        self.rows = rows
        self.n = n
        fabric_ids, fab_of_row = np.unique(c["fabric_id"], return_inverse=True)
        pbit, self.prof_notice, self.prof_rate = reclaim_profiles(c["notice_s"], c["rate_mph"])
        fabric_ids, fab_of_row = _fabric_order(fabric_ids, fab_of_row, pbit, c)
        lf = rows_empty(n, K.NL)
        # One row-major pass (column-wise fancy indexing into lf is several times slower).
        self._leaf_of_row = K.fill_leaves(lf, np.ascontiguousarray(rows, np.int64), c["floor"], c["free"], c["gpus"],
                      c["host_gpus"], c["available_until"], c["firm_until"], c["cut_at"],
                      c["notice_s"], c["rate_mph"], np.ascontiguousarray(fab_of_row, np.int64),
                      c["block_id"], pbit)
        fab = lf[:, K.L_FAB]
        self.lf = lf
        self.floors = np.ascontiguousarray(lf[:, K.L_FLOOR])

        self.size = 1 << max(0, (n - 1).bit_length()) if n > 0 else 1
        self.dyn = rows_empty(2 * self.size, K.NT)
        self.stat = rows_empty(2 * self.size, K.NT)
        K.build_trees(lf, n, self.size, self.dyn, self.stat, _BIT)

        # Whole-host blocks per fabric, in (floor, block_id) order: multi-host gangs use these.
        nfab = len(fabric_ids)
        self.whole = np.flatnonzero(lf[:, K.L_GPUS] == lf[:, K.L_HOSTG])
        whole_fab = fab[self.whole]
        fab_leaf = np.ascontiguousarray(self.whole[_stable_small_order(whole_fab, nfab)])
        counts = np.bincount(whole_fab, minlength=nfab)
        self.fab_end = np.cumsum(counts).astype(np.int64)
        self.fab_start = (self.fab_end - counts).astype(np.int64)
        fw = rows_empty(len(fab_leaf), K.NW)
        self.fx = np.empty((len(fab_leaf), K.NX), dtype=np.int64)
        K.fill_whole(lf, fab_leaf, fw, self.fx)
        self.fw = fw
        self.fsize = 1 << max(0, (nfab - 1).bit_length()) if nfab > 0 else 1
        # fid[node]: the lowest fabric_id under node of the fabric trees (ties go to it).
        self.fid = np.full(2 * self.fsize, INT64_MAX, np.int64)
        self.fid[self.fsize: self.fsize + nfab] = fabric_ids
        for level_start in (self.fsize >> k for k in range(1, self.fsize.bit_length())):
            nodes = np.arange(level_start, 2 * level_start)
            self.fid[nodes] = np.minimum(self.fid[2 * nodes], self.fid[2 * nodes + 1])
        self.ftree = rows_empty(2 * self.fsize, K.NT)
        K.build_fabric_tree(fw, self.fx, self.fab_start, self.fab_end, self.fsize, self.ftree, False)
        self.fdyn = rows_empty(2 * self.fsize, K.NT)
        # The static multi-host bounds are kept between ticks for these gang sizes (None: not
        # built).
        self._multi_key: bytes | None = None
        self.fab_first = self.fab_start.copy()
        self._wlb_buf = _EMPTY_I64

        # For reason NOTICE_TOO_LONG: the widest spot window among blocks with notice >= x.
        # (From the table's own columns: contiguous, unlike lf's.)
        by_notice = np.argsort(c["notice_s"])
        notice = c["notice_s"][by_notice]
        espot = np.minimum(c["available_until"], c["cut_at"])[by_notice]
        first = np.flatnonzero(np.r_[True, notice[1:] != notice[:-1]]) if n else _EMPTY_I64
        nv = notice[first]
        nbest = np.maximum.accumulate(espot[::-1])[::-1][first] if n else _EMPTY_I64
        self.nv = np.ascontiguousarray(nv.astype(np.int64))
        self.nbest = np.ascontiguousarray(nbest.astype(np.int64))
        self.max_host = int(c["host_gpus"].max()) if n else 0

    def patch_free(self, table: BlockTable, rows: np.ndarray) -> None:
        """Take the `free` of these table rows (nothing else changed) into the index."""
        leaves = np.ascontiguousarray(self.leaf_of_row()[rows])
        K.patch_free(self.lf, leaves, np.ascontiguousarray(table.cols["free"][rows], np.int64),
                     self.size, self.dyn, _BIT, self.fw)

    def prepare_multi(self, now: int, cls_key: np.ndarray) -> np.ndarray:
        """Per-tick multi-host structures for the bid classes `cls_key` (see kernels, multi-host
        gangs): the window bounds over the hosts entirely free now and the free aggregates per
        fabric, and the static bounds when the gang sizes changed.  Returns each class's window
        threshold (-1 for single-host classes)."""
        gpus = cls_key[:, K.K_GPUS]
        multi = gpus > self.max_host
        self.mg = np.ascontiguousarray(np.unique(gpus[multi]).astype(np.int64))
        key = self.mg.tobytes()
        if self._multi_key != key:
            # The static bounds only depend on the blocks (this index) and the gang sizes.
            self.static_lb, self.sorder = K.prepare_multi_static(
                self.fw, self.fab_start, self.fab_end, self.mg
            )
            self._multi_key = key
        # Thresholds: per tier the durations of its multi-host classes, at most `per_tier` of
        # them (spread over the sorted durations, the shortest always kept); a class reads the
        # longest threshold not above its own duration.
        per_tier = max(1, min(_MAX_THRESHOLDS,
                              _WLB_ENTRIES // max(1, 2 * len(self.mg) * 2 * self.fsize)))
        cls_t = np.full(len(cls_key), -1, np.int64)
        tw_col, tw_dur = [], []
        for tier, col in ((Tier.FIRM, K.E_EFIRM), (Tier.SPOT, K.E_ESPOT)):
            mine = np.flatnonzero(multi & (cls_key[:, K.K_TIER] == tier))
            if not len(mine):
                continue
            durs = np.unique(cls_key[mine, K.K_DUR])
            if len(durs) > per_tier:
                durs = durs[(np.arange(per_tier) * len(durs)) // per_tier]
            cls_t[mine] = len(tw_col) + np.searchsorted(durs, cls_key[mine, K.K_DUR], "right") - 1
            tw_col += [col] * len(durs)
            tw_dur += durs.tolist()
        self.tw_col = np.array(tw_col, np.int64)
        self.tw_end = now + np.array(tw_dur, np.int64)
        shape = (len(tw_col), 2 * self.fsize, len(self.mg))
        entries = len(tw_col) * 2 * self.fsize * len(self.mg)
        if self._wlb_buf.size < entries:
            self._wlb_buf = np.empty(entries, np.int64)  # reused: no fresh pages per tick
        self.wlb = self._wlb_buf[:entries].reshape(shape)
        self.wtop = np.empty((len(self.fab_start), len(tw_col)), np.int64)
        K.build_window_bounds(self.fw, self.fab_start, self.fab_end, self.fab_first, self.mg,
                              self.wlb, self.tw_col, self.tw_end, self.fsize, self.wtop)
        # Over the whole hosts still entirely free (only shrinks during the tick: stays a bound).
        K.build_fabric_tree(self.fw, self.fx, self.fab_start, self.fab_end, self.fsize, self.fdyn, True)
        return cls_t

    def lowest_free_floor(self) -> int:
        """Lowest floor among blocks with free > 0, or -1."""
        f = int(K.lowest_free_floor(self.lf, self.size, self.dyn))
        return -1 if f == INT64_MAX else f

    def leaf_of_row(self) -> np.ndarray:
        """Leaf of each BlockTable row (the inverse of `rows`)."""
        return self._leaf_of_row


class BidRun:
    """Bids in two orders: priority (limit desc, seq asc) and id.

    `state` (priority order) and `id_state` (bid_id order) are kept equal (`id_state[i] ==
    state[pos[i]]`; `rank` is the inverse of `pos`), so that reporting losers in bid_id order is
    a sequential scan."""

    __slots__ = ("bid", "cls", "id_cls", "id_lim", "id_state", "ids", "lim", "pos", "rank",
                 "seq", "state")

    def __init__(self, bid, lim, seq, cls, state, ids, pos, id_lim, id_cls, id_state,
                 rank) -> None:
        self.bid, self.lim, self.seq, self.cls, self.state = bid, lim, seq, cls, state
        self.ids, self.pos, self.id_lim, self.id_cls = ids, pos, id_lim, id_cls
        self.id_state, self.rank = id_state, rank

    def __len__(self) -> int:
        return len(self.bid)

    @classmethod
    def empty(cls) -> BidRun:
        i64 = np.empty(0, np.int64)
        i32 = np.empty(0, np.int32)
        return cls(i64, i64.copy(), i64.copy(), i32, np.empty(0, np.int8), i64.copy(),
                   i32.copy(), i64.copy(), i32.copy(), np.empty(0, np.int8), i32.copy())

    @classmethod
    def from_batch(cls, bid: np.ndarray, lim: np.ndarray, seq: np.ndarray, klass: np.ndarray):
        # numpy's lexsort is much faster than numba's sort for the initial order.
        order = np.lexsort((seq, -lim))
        inv = np.empty(len(order), np.int32)
        inv[order] = np.arange(len(order), dtype=np.int32)
        by_id = np.argsort(bid, kind="stable")
        pos = np.ascontiguousarray(inv[by_id])
        rank = np.empty(len(order), np.int32)
        rank[pos] = np.arange(len(order), dtype=np.int32)
        c = np.ascontiguousarray
        return cls(
            c(bid[order]), c(lim[order]), c(seq[order]), c(klass[order].astype(np.int32)),
            np.full(len(bid), K.STATE_LIVE, np.int8),
            c(bid[by_id]), pos, c(lim[by_id]), c(klass[by_id].astype(np.int32)),
            np.full(len(bid), K.STATE_LIVE, np.int8), rank,
        )

    def merged_with(self, other: BidRun) -> BidRun:
        return BidRun(*K.merge_runs(
            self.bid, self.lim, self.seq, self.cls, self.state, self.ids, self.pos,
            other.bid, other.lim, other.seq, other.cls, other.state, other.ids, other.pos,
        ))

    def kill(self, bid_ids: np.ndarray) -> int:
        """Mark the live bids among bid_ids dead; returns how many."""
        if len(self.ids) == 0 or len(bid_ids) == 0:
            return 0
        at = np.searchsorted(self.ids, bid_ids)
        inside = at < len(self.ids)
        at = at[inside]
        hit = at[self.ids[at] == bid_ids[inside]]
        hit = hit[self.id_state[hit] == K.STATE_LIVE]
        self.id_state[hit] = K.STATE_DEAD
        self.state[self.pos[hit]] = K.STATE_DEAD
        return len(hit)

    def live_count(self, tier: Tier) -> int:
        return int(np.count_nonzero((self.state == K.STATE_LIVE) & (self.bid % 2 == int(tier))))


# Internal ids and sequence numbers carry the tier in their lowest bit (see the module docstring).
_ID_BOUND = 1 << 62


def internal_ids(tier: Tier, ids: np.ndarray) -> np.ndarray:
    return np.asarray(ids, np.int64) * 2 + int(tier)


class BidBook:
    """Bids of both tiers of a model and their class table (a class belongs to one tier)."""

    def __init__(self) -> None:
        self.main = BidRun.empty()
        self.pend = BidRun.empty()
        self.n_dead = 0
        self.n_cls = 0
        self.cls_key = np.zeros((64, K.NK), np.int64)
        self.cls_st = np.full((64, K.NC), -1, np.int64)
        self.hkeys = np.zeros((128, K.NK), np.int64)
        self.hvals = np.full(128, -1, np.int64)
        self._ecls_for = -1  # n_cls for which ecls/dom were computed
        self.ecls = np.empty(0, np.int32)
        self.n_ecls = 0
        self.dom_ptr = np.zeros(1, np.int64)
        self.dom_idx = np.empty(0, np.int64)

    def eligibility_classes(self):
        """Eligibility classes (tier, duration, min_notice, hazard budget: the bid class without
        gpus) and, for each, the classes of its tier whose eligible blocks are a subset of its
        own at any `now` (longer duration, longer notice, smaller budget), itself included, as
        CSR lists."""
        if self._ecls_for != self.n_cls:
            cols = [K.K_TIER, K.K_DUR, K.K_MN, K.K_BUDGET]
            ukeys, inv = np.unique(self.cls_key[: self.n_cls][:, cols], axis=0, return_inverse=True)
            ne = len(ukeys)
            if ne <= 2048:
                tier, dur, mn, bud = ukeys[:, 0], ukeys[:, 1], ukeys[:, 2], ukeys[:, 3]
                sub = ((tier[None, :] == tier[:, None]) & (dur[None, :] >= dur[:, None])
                       & (mn[None, :] >= mn[:, None]) & (bud[None, :] <= bud[:, None]))
            else:  # too many to compare pairwise every time classes appear: only themselves
                sub = None
            if sub is None:
                self.dom_ptr = np.arange(ne + 1, dtype=np.int64)
                self.dom_idx = np.arange(ne, dtype=np.int64)
            else:
                self.dom_ptr = np.concatenate([[0], np.cumsum(sub.sum(axis=1))]).astype(np.int64)
                self.dom_idx = np.ascontiguousarray(np.nonzero(sub)[1].astype(np.int64))
            self.ecls = np.ascontiguousarray(inv.reshape(-1).astype(np.int32))
            self.n_ecls = ne
            self._ecls_for = self.n_cls
        return self.ecls, self.n_ecls, self.dom_ptr, self.dom_idx

    def _classes(self, keys: np.ndarray) -> np.ndarray:
        out = np.empty(len(keys), np.int32)
        start = 0
        while True:
            start, self.n_cls = K.assign_classes(
                keys, start, self.hkeys, self.hvals, self.n_cls, self.cls_key, out
            )
            if start == len(keys):
                return out
            # Grow both tables (doubling) and resume where the kernel stopped.
            cap = len(self.hvals) * 2
            self.hkeys = np.zeros((cap, K.NK), np.int64)
            self.hvals = np.full(cap, -1, np.int64)
            if len(self.cls_key) < cap // 2:
                grown = np.zeros((cap // 2, K.NK), np.int64)
                grown[: self.n_cls] = self.cls_key[: self.n_cls]
                self.cls_key = grown
                st = np.full((cap // 2, K.NC), -1, np.int64)
                st[: len(self.cls_st)] = self.cls_st
                self.cls_st = st
            K.rehash_classes(self.cls_key, self.n_cls, self.hkeys, self.hvals)

    def add(self, tier: Tier, c: dict[str, np.ndarray]) -> None:
        validate_bids(c)
        for name in ("bid_id", "seq"):
            if len(c[name]) and not (-_ID_BOUND <= c[name].min() and c[name].max() < _ID_BOUND):
                raise ValueError(f"{name} must be in [-2**62, 2**62)")
        self.remove(tier, c["bid_id"])  # re-adding a bid_id replaces it
        keys = np.empty((len(c["bid_id"]), K.NK), np.int64)
        keys[:, K.K_DUR] = c["duration_s"]
        keys[:, K.K_GPUS] = c["gpus"]
        keys[:, K.K_TIER] = int(tier)
        if tier == Tier.FIRM:
            # Firm eligibility ignores notice and survival: do not split classes on them.
            keys[:, K.K_MN] = 0
            keys[:, K.K_BUDGET] = INT64_MAX
        else:
            keys[:, K.K_MN] = c["min_notice_s"]
            keys[:, K.K_BUDGET] = c["hazard_budget"]
        klass = self._classes(keys)
        run = BidRun.from_batch(internal_ids(tier, c["bid_id"]), c["limit"],
                                internal_ids(tier, c["seq"]), klass)
        if len(self.main) == 0 and len(self.pend) == 0:
            self.main = run
        else:
            self.pend = self.pend.merged_with(run) if len(self.pend) else run
            if len(self.pend) > max(4096, len(self.main) // 16):
                self.compact()

    def remove(self, tier: Tier, bid_ids: np.ndarray) -> None:
        ids = np.unique(internal_ids(tier, np.asarray(bid_ids, np.int64).reshape(-1)))
        self.n_dead += self.main.kill(ids) + self.pend.kill(ids)

    def compact(self) -> None:
        """Merge the pending run into the main run and drop dead bids (O(live bids))."""
        self.main = self.main.merged_with(self.pend)
        self.pend = BidRun.empty()
        self.n_dead = 0

    def maybe_compact(self) -> None:
        if self.n_dead > max(4096, (len(self.main) + len(self.pend)) // 4):
            self.compact()


class ModelBook:
    """Order book of one GPU model (both tiers), kept between ticks.  See docs/matching.md."""

    def __init__(self) -> None:
        self._blocks = BlockTable()
        self._index: BlockIndex | None = None
        self._bids = BidBook()
        self._inc_ids = _EMPTY_I64
        self._inc_lim = _EMPTY_I64
        self._tick = 0
        self._losers: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    # -- supply ---------------------------------------------------------------------------------

    def upsert_blocks(self, block_id, host_id, fabric_id, host_gpus, gpus, free, floor,
                      available_until, firm_until, notice_s, rate_mph, cut_at) -> None:
        """Insert blocks, or replace the blocks with these block_ids (all columns)."""
        self._blocks.upsert(as_columns(BLOCK_FIELDS, (
            block_id, host_id, fabric_id, host_gpus, gpus, free, floor,
            available_until, firm_until, notice_s, rate_mph, cut_at,
        )))

    def remove_blocks(self, block_ids) -> None:
        self._blocks.remove(block_ids)

    def blocks(self) -> dict[str, np.ndarray]:
        """Current block columns (sorted by block_id), `free` as left by the last tick."""
        return {k: v.copy() for k, v in self._blocks.cols.items()}

    # -- demand ---------------------------------------------------------------------------------

    def add_bids(self, tier, bid_id, seq, gpus, duration_s, limit, hazard_budget,
                 min_notice_s) -> None:
        """Add bids to a tier (re-adding a live bid_id replaces it)."""
        self._bids.add(Tier(tier), as_columns(BID_FIELDS, (
            bid_id, seq, gpus, duration_s, limit, hazard_budget, min_notice_s,
        )))

    def remove_bids(self, tier, bid_ids) -> None:
        self._bids.remove(Tier(tier), bid_ids)

    def bid_count(self, tier) -> int:
        b = self._bids
        return b.main.live_count(Tier(tier)) + b.pend.live_count(Tier(tier))

    def live_bid_ids(self) -> np.ndarray:
        """The bid ids the book holds live, both tiers (winners leave during `tick`): what the
        service compares with the open bids in its database (book drift)."""
        runs = (self._bids.main, self._bids.pend)
        return np.concatenate([run.ids[run.id_state == K.STATE_LIVE] for run in runs]) // 2

    def set_incumbents(self, lease_id, limit) -> None:
        """Running spot leases (replaces the previous set)."""
        ids = np.asarray(lease_id, np.int64).reshape(-1)
        lim = np.asarray(limit, np.int64).reshape(-1)
        if len(ids) != len(lim):
            raise ValueError("lease_id and limit differ in length")
        order = np.argsort(ids, kind="stable")
        self._inc_ids = np.ascontiguousarray(ids[order])
        self._inc_lim = np.ascontiguousarray(lim[order])

    def eligible_free(self, tier, now: int, duration_s: int, min_notice_s: int, hazard_budget: int) -> int:
        """Free GPUs now on the blocks that a bid with these terms is eligible for (the rule's
        eligibility without floor), as the next tick would see them: call it before `tick`."""
        idx = self._index_for_tick()
        now = int(now)
        return int(K.eligible_free(int(Tier(tier)), idx.lf, idx.n, now, now + int(duration_s),
                                   int(min_notice_s), int(hazard_budget)))

    def compact(self) -> None:
        """Drop dead bids and fold pending additions into the main runs (optional upkeep)."""
        self._bids.compact()

    # -- tick -----------------------------------------------------------------------------------

    def _index_for_tick(self) -> BlockIndex:
        table = self._blocks
        if self._index is None or table.order_dirty:
            self._index = BlockIndex(table)
        elif table.values_dirty:
            self._index = BlockIndex(table, rows=self._index.rows)
        elif table.free_rows:
            self._index.patch_free(table, np.unique(np.concatenate(table.free_rows)))
        table.clear_dirty()
        return self._index

    def tick(self, now: int) -> ModelTickResult:
        """Clear both tiers in one price-time priority walk.  Winners leave the book; `free`
        drops."""
        now = int(now)
        self._tick += 1
        idx = self._index_for_tick()
        bb = self._bids
        cls_t = idx.prepare_multi(now, bb.cls_key[: bb.n_cls])
        # Every fill takes at least one GPU: the free GPUs bound the fills.
        cap = int(self._blocks.cols["free"].sum(dtype=np.int64)) + 1
        fill_bid, fill_block, fill_gpus, fill_tier, ts = self._allocate(now, idx, cap, cls_t)
        # Prices per tier (docs/matching.md, Price); losers are measured against `indicative`,
        # which is the price when something traded, incumbents against the competing limit.
        price = np.full(2, -1, np.int64)
        indicative = np.zeros(2, np.int64)
        for t in range(2):
            if ts[t, K.S_WINNERS]:
                price[t] = min(max(ts[t, K.S_HIGHEST_LOSE], ts[t, K.S_MAX_FLOOR]), ts[t, K.S_LOWEST_WIN])
                indicative[t] = price[t]
            else:
                indicative[t] = max(ts[t, K.S_HIGHEST_LOSE], idx.lowest_free_floor(), 0)
        fills = K.split_fills(fill_bid, fill_block, fill_gpus, fill_tier)
        hs = np.empty(2, np.uint64)
        for t in range(2):
            hs[t] = K.hash_head(*fills[t], price[t], indicative[t])
        l_bid, l_code, l_short = self._loser_buffers(len(bb.main) + len(bb.pend))
        nl = np.zeros(2, np.int64)
        m, p = bb.main, bb.pend
        K.emit_losers(
            now, self._tick, indicative, idx.max_host, bb.n_cls,
            m.ids, m.pos, m.id_lim, m.id_cls, m.state, m.id_state,
            p.ids, p.pos, p.id_lim, p.id_cls, p.state, p.id_state,
            bb.cls_key, bb.cls_st,
            idx.lf, idx.size, idx.stat, idx.nv, idx.nbest,
            idx.fab_start, idx.fab_end, idx.fw, idx.mg, idx.static_lb, idx.sorder,
            idx.fsize, idx.ftree, idx.prof_notice, idx.prof_rate, l_bid, l_code, l_short, nl, hs,
        )
        bb.n_dead += int(ts[:, K.S_WINNERS].sum())
        results = []
        for t in (Tier.FIRM, Tier.SPOT):
            n = nl[t]
            competing = int(ts[t, K.S_HIGHEST_LOSE])
            if t == Tier.SPOT:
                # Only a competing bid that lost and pays more ends a running lease (SPEC §4):
                # never a floor, so neither `indicative` nor a price raised to a floor counts.
                outbid = np.ascontiguousarray(self._inc_ids[self._inc_lim < competing])
            else:
                outbid = _EMPTY_I64
            results.append(TickResult(
                fill_bid_id=fills[t][0], fill_block_id=fills[t][1], fill_gpus=fills[t][2],
                price=int(price[t]), indicative=int(indicative[t]), competing_limit=competing,
                loser_bid_id=l_bid[t, :n], loser_reason=l_code[t, :n],
                loser_shortfall=l_short[t, :n],
                outbid_lease_id=outbid, state_hash=int(K.hash_tail(hs[t], outbid)),
            ))
        # Only the filled blocks changed `free`: write them back to the table (all of them when
        # the fills are many: one pass costs less than looking each fill's row up).
        if len(fill_block):
            table_free = self._blocks.cols["free"]
            if len(fill_block) > idx.n // 8:
                table_free[idx.lf[:, K.L_ROW]] = idx.lf[:, K.L_FREE]
            else:
                rows = np.searchsorted(self._blocks.cols["block_id"], fill_block)
                table_free[rows] = idx.lf[idx.leaf_of_row()[rows], K.L_FREE]
        bb.maybe_compact()
        return ModelTickResult(firm=results[0], spot=results[1])

    def _loser_buffers(self, n: int):
        """Per-tier rows for up to n losers: (bid_id, reason, shortfall).  The results of a tick
        are views of these; they are reused only when no result of an earlier tick still holds
        them, because writing a million losers into fresh memory every tick costs page faults
        (several ms, and tens of ms on a busy machine) that reused memory does not.  Two sets are
        kept, as a caller typically holds the last result while it runs the next tick."""
        for bufs in self._losers:
            # 3 references: the tuple, `b` and getrefcount's argument; a result's view is a 4th.
            if bufs[0].shape[1] >= n and all(sys.getrefcount(b) <= 3 for b in bufs):
                return bufs
        cap = max(n + n // 4, 1024)
        bufs = (np.empty((2, cap), np.int64), np.empty((2, cap), np.int8),
                np.empty((2, cap), np.int64))
        self._losers = [bufs, *self._losers[:1]]
        return bufs

    def _allocate(self, now: int, idx: BlockIndex, cap: int, cls_t: np.ndarray):
        """Run kernels.clear_book: (fill bid (internal ids), block, gpus, tier, per-tier figures)."""
        tb = self._bids
        m, p = tb.main, tb.pend
        ecls, n_ecls, dom_ptr, dom_idx = tb.eligibility_classes()
        fail_single = np.full(n_ecls, INT64_MAX, np.int64)
        fail_multi = np.full(n_ecls, INT64_MAX, np.int64)
        fill_bid = np.empty(cap, np.int64)
        fill_block = np.empty(cap, np.int64)
        fill_gpus = np.empty(cap, np.int32)
        fill_tier = np.empty(cap, np.int8)
        ts = np.empty((2, K.NS), np.int64)
        nf = K.clear_book(
            now, self._tick, idx.max_host,
            m.bid, m.lim, m.seq, m.cls, m.state, m.id_state, m.rank,
            p.bid, p.lim, p.seq, p.cls, p.state, p.id_state, p.rank,
            tb.cls_key, tb.cls_st,
            idx.lf, idx.floors, idx.n, idx.size, idx.dyn, idx.stat, _BIT, _GE, _LE,
            idx.fab_start, idx.fab_end, idx.fw, idx.fx, idx.nv, idx.nbest,
            idx.mg, idx.fab_first, idx.wlb, idx.wtop, idx.tw_col, idx.tw_end, cls_t, idx.fsize,
            idx.ftree, idx.fdyn, idx.fid, idx.static_lb, idx.sorder, idx.prof_notice,
            idx.prof_rate, ecls, dom_ptr, dom_idx, fail_single, fail_multi,
            fill_bid, fill_block, fill_gpus, fill_tier, ts,
        )
        return fill_bid[:nf], fill_block[:nf], fill_gpus[:nf], fill_tier[:nf], ts
