"""Numba kernels of the matching engine (docs/matching.md).

Data layout, built by `matching.book.BlockIndex`:

* `lf[n, NL]` (int64): one row per block, rows sorted by (floor, block_id); a row is a "leaf".
  Row-major so that testing one block touches one or two cache lines.
* A segment tree over the leaves (node 1 = root, leaf i = node size + i) with two aggregates:
  `dyn[node, :]` over the leaves that still have free GPUs (changes as GPUs are allocated), and
  `stat[node, :]` over all leaves (only changes when blocks change).  Both hold, per subtree,
  the maxima of the windows (available_until combined with firm_until or cut_at), notice and
  firm_until, and the minimum reclaim rate; a subtree whose aggregates already fail the bid's
  eligibility is skipped.  `dyn[:, MASK]` is a bitset of the free counts present (bit
  min(free, 63)), so "free >= g" and "tighter than the best so far" prune too.
* Fabrics: `fw[fab_start[f]:fab_end[f]]` are the blocks of fabric f (dense index, in fabric_id
  order) that are whole hosts (gpus == host_gpus), in (floor, block_id) order, as a compact copy
  of what multi-host searches read (`fx[j, X_LEAF]` is the leaf; `lf[leaf, L_FPOS]` is j).
* Bid classes: bids of a tier with the same (duration_s, min_notice_s, hazard_budget, gpus) are eligible on
  the same blocks, so the expensive per-bid questions (structural reason, "nothing fits any
  more") are answered once per class per tick: `cls_key[c]` and `cls_st[c]`.
"""

from __future__ import annotations

import numpy as np
from numba import njit

I64_MAX = np.iinfo(np.int64).max
I64_MIN = np.iinfo(np.int64).min

FIRM = 0
SPOT = 1

# Positions 1-5 hold what eligibility reads, in lf, fw and the trees alike, so that one test
# (`eligible`) serves a block of lf and of fw (node_may_fit reads the same positions).
E_EFIRM = 1  # min(available_until, firm_until): the end a firm bid may reach (tree: max)
E_ESPOT = 2  # min(available_until, cut_at): the end a spot bid may reach (tree: max)
E_NOTICE = 3  # reclaim notice (tree: max)
E_FIRM = 4  # firm_until (tree: max)
E_RATE = 5  # reclaim rate (tree: min)

# lf columns; what a search tests of a leaf comes first, in one 64-byte stretch of the row
L_FREE = 0
L_EFIRM = E_EFIRM
L_ESPOT = E_ESPOT
L_NOTICE = E_NOTICE
L_FIRM = E_FIRM
L_RATE = E_RATE
L_FLOOR = 6
L_GPUS = 7
L_HOSTG = 8
L_AVAIL = 9
L_CUT = 10
L_FAB = 11  # dense fabric index
L_BLOCK = 12  # block_id
L_ROW = 13  # row in the BlockTable
L_PBIT = 14  # bit of the block's reclaim profile (notice, rate), see BlockIndex
L_FPOS = 15  # row in `fw` when the block is a whole host, else -1
NL = 16

# fw columns: one row per whole-host block, grouped by fabric (fab_start/fab_end) and in
# (floor, block_id) order within a fabric, so that a multi-host search scans memory in order.
W_FREE = 0  # kept equal to lf[leaf, L_FREE]
W_EFIRM = E_EFIRM
W_ESPOT = E_ESPOT
W_NOTICE = E_NOTICE
W_FIRM = E_FIRM
W_RATE = E_RATE
W_FLOOR = 6
W_GPUS = 7
NW = 8  # 64 bytes: a host the scans read is one cache line

# fx columns: what the scans do not read of fw's rows, in the same row order
X_AVAIL = 0
X_PBIT = 1
X_LEAF = 2
NX = 3

# tree columns (dyn, stat and the fabric trees)
T_MASK = 0  # dyn: bitset of free counts
T_GPUS = 0  # stat: max gpus
T_EFIRM = E_EFIRM
T_ESPOT = E_ESPOT
T_NOTICE = E_NOTICE
T_FIRM = E_FIRM
T_RATE = E_RATE
T_AVAIL = 6
T_PMASK = 7  # bitset of the reclaim profiles present
NT = 8

# cls_key columns
K_DUR = 0
K_MN = 1
K_BUDGET = 2
K_GPUS = 3
K_TIER = 4  # FIRM or SPOT: the two tiers' bids share one book and one priority walk
NK = 5

# cls_st columns (per tick)
C_STAMP = 0  # tick number in which CODE/NEED were computed
C_CODE = 1  # 0 = structurally eligible, else reason 1-6
C_NEED = 2  # lowest floor at which it would fit (when CODE == 0)
C_NSTAMP = 3  # tick number in which NEED was computed
C_PSTAMP = 4  # tick number in which POK/PCOND were computed
C_POK = 5  # reclaim profiles that pass notice and survival whatever the firm window
C_PCOND = 6  # reclaim profiles that pass notice and may pass survival thanks to a firm window
C_CSTAMP = 7  # tick number in which CURSOR was last set
C_CURSOR = 8  # no leaf left of it fits the class any more this tick (free only shrinks)
NC = 9

R_NO_SUPPLY_WINDOW = 1
R_NO_FIRM_WINDOW = 2
R_RESERVATION = 3
R_NOTICE_TOO_LONG = 4
R_SURVIVAL_TOO_HIGH = 5
R_TOO_LARGE = 6
R_LIMIT_BELOW_PRICE = 7
R_BELOW_FLOOR = 8
R_NO_CAPACITY = 9

STATE_DEAD = 0
STATE_LIVE = 1
STATE_WON = 2  # won in the tick being computed; becomes DEAD once reported

FNV_OFFSET = np.uint64(0xCBF29CE484222325)
FNV_PRIME = np.uint64(0x100000001B3)


def bit_table():
    """BIT[b] = 1 << b as int64 bit patterns (bit 63 is the sign bit)."""
    return np.array([1 << b for b in range(64)], dtype=np.uint64).view(np.int64)


def mask_tables():
    """GE[b] = bits >= b, LE[b] = bits <= b, as int64 bit patterns."""
    ge = np.array([((1 << 64) - 1) ^ ((1 << b) - 1) for b in range(65)], dtype=np.uint64)
    le = np.array([(1 << (b + 1)) - 1 for b in range(64)], dtype=np.uint64)
    return ge.view(np.int64), le.view(np.int64)


# ---------------------------------------------------------------------------------------------
# eligibility


@njit(cache=True)
def eligible(tier, rows, i, now, end, mn, budget):
    """The rule's eligibility of a bid on block row i of lf or fw, without floor and free."""
    if tier == FIRM:
        return rows[i, E_EFIRM] >= end
    if rows[i, E_ESPOT] < end or rows[i, E_NOTICE] < mn:
        return False
    x = end - max(now, rows[i, E_FIRM])
    return x <= 0 or rows[i, E_RATE] * x <= budget


@njit(cache=True)
def eligible_free(tier, lf, n, now, end, mn, budget):
    """Free GPUs on the blocks a bid's terms fit (`eligible`: without floor, whatever the host
    size): what a quote reports as eligible, by the same test the tick applies."""
    total = 0
    for i in range(n):
        if lf[i, L_FREE] > 0 and eligible(tier, lf, i, now, end, mn, budget):
            total += lf[i, L_FREE]
    return total


@njit(cache=True)
def node_may_fit(tier, t, node, now, end, mn, budget, pmask):
    """False when no leaf under `node` can pass eligibility.  The aggregates are per-dimension
    bounds; the reclaim-profile bitset `pmask` (profiles that may pass notice and survival)
    keeps them from mixing notice and rate of different blocks.  The same test as `eligible`
    plus the profile bitset, written out: calling `eligible` here measured a quarter slower on
    the benchmark's full tick (this runs for every tree node a search visits)."""
    if tier == FIRM:
        return t[node, T_EFIRM] >= end
    if t[node, T_ESPOT] < end or t[node, T_NOTICE] < mn or t[node, T_PMASK] & pmask == 0:
        return False
    x = end - max(now, t[node, T_FIRM])
    return x <= 0 or t[node, T_RATE] * x <= budget


@njit(cache=True)
def profile_masks(tier, now, tick, c, cls_key, cls_st, prof_notice, prof_rate):
    """Profiles a class may use, cached per tick in cls_st: those that pass whatever the firm
    window (POK) and those that need one (PCOND).  Returns POK | PCOND."""
    if cls_st[c, C_PSTAMP] != tick:
        pok = 0
        pcond = 0
        if tier == FIRM:
            pok = -1
        else:
            dur = cls_key[c, K_DUR]
            for p in range(len(prof_notice)):
                if prof_notice[p] < cls_key[c, K_MN]:
                    continue
                if prof_rate[p] * dur <= cls_key[c, K_BUDGET]:
                    pok |= np.int64(1) << p
                else:
                    pcond |= np.int64(1) << p
        cls_st[c, C_POK] = pok
        cls_st[c, C_PCOND] = pcond
        cls_st[c, C_PSTAMP] = tick
    return cls_st[c, C_POK] | cls_st[c, C_PCOND]


# ---------------------------------------------------------------------------------------------
# segment tree


@njit(cache=True)
def _set_identity(t, node):
    t[node, 0] = 0
    t[node, T_EFIRM] = I64_MIN
    t[node, T_ESPOT] = I64_MIN
    t[node, T_NOTICE] = I64_MIN
    t[node, T_FIRM] = I64_MIN
    t[node, T_RATE] = I64_MAX
    t[node, T_AVAIL] = I64_MIN
    t[node, T_PMASK] = 0


@njit(cache=True)
def _set_leaf_values(t, node, lf, i):
    t[node, T_EFIRM] = lf[i, L_EFIRM]
    t[node, T_ESPOT] = lf[i, L_ESPOT]
    t[node, T_NOTICE] = lf[i, L_NOTICE]
    t[node, T_FIRM] = lf[i, L_FIRM]
    t[node, T_RATE] = lf[i, L_RATE]
    t[node, T_AVAIL] = lf[i, L_AVAIL]
    t[node, T_PMASK] = lf[i, L_PBIT]


@njit(cache=True)
def _combine(t, node, is_dyn):
    """Recompute node from its children.  Returns whether it changed: when it did not, no
    ancestor changes either, so an update climbing to the root may stop there."""
    a = 2 * node
    b = a + 1
    if is_dyn:
        v0 = t[a, T_MASK] | t[b, T_MASK]
    else:
        v0 = max(t[a, T_GPUS], t[b, T_GPUS])
    v1 = max(t[a, T_EFIRM], t[b, T_EFIRM])
    v2 = max(t[a, T_ESPOT], t[b, T_ESPOT])
    v3 = max(t[a, T_NOTICE], t[b, T_NOTICE])
    v4 = max(t[a, T_FIRM], t[b, T_FIRM])
    v5 = min(t[a, T_RATE], t[b, T_RATE])
    v6 = max(t[a, T_AVAIL], t[b, T_AVAIL])
    v7 = t[a, T_PMASK] | t[b, T_PMASK]
    changed = (t[node, 0] != v0 or t[node, T_EFIRM] != v1 or t[node, T_ESPOT] != v2
               or t[node, T_NOTICE] != v3 or t[node, T_FIRM] != v4 or t[node, T_RATE] != v5
               or t[node, T_AVAIL] != v6 or t[node, T_PMASK] != v7)
    t[node, 0] = v0
    t[node, T_EFIRM] = v1
    t[node, T_ESPOT] = v2
    t[node, T_NOTICE] = v3
    t[node, T_FIRM] = v4
    t[node, T_RATE] = v5
    t[node, T_AVAIL] = v6
    t[node, T_PMASK] = v7
    return changed


@njit(cache=True)
def _set_dyn_leaf(dyn, size, lf, i, bit):
    node = size + i
    f = lf[i, L_FREE]
    if f > 0:
        dyn[node, T_MASK] = bit[min(f, 63)]
        _set_leaf_values(dyn, node, lf, i)
    else:
        _set_identity(dyn, node)


@njit(cache=True)
def build_trees(lf, n, size, dyn, stat, bit):
    for i in range(size):
        node = size + i
        if i < n:
            _set_dyn_leaf(dyn, size, lf, i, bit)
            stat[node, T_GPUS] = lf[i, L_GPUS]
            _set_leaf_values(stat, node, lf, i)
        else:
            _set_identity(dyn, node)
            _set_identity(stat, node)
            stat[node, T_GPUS] = 0
    for node in range(size - 1, 0, -1):
        _combine(dyn, node, True)
        _combine(stat, node, False)


@njit(cache=True)
def _fabric_leaf(fw, fx, fab_start, fab_end, fsize, ftree, f, only_free):
    """Eligibility aggregates (as in `stat`, T_GPUS = their GPU total) over fabric f's whole-host
    blocks, or over those still entirely free when `only_free`."""
    node = fsize + f
    _set_identity(ftree, node)
    ftree[node, T_GPUS] = 0
    if f < len(fab_start):
        for j in range(fab_start[f], fab_end[f]):
            i = j
            if only_free and not _whole_free(fw, i):
                continue
            ftree[node, T_GPUS] += fw[i, W_GPUS]
            ftree[node, T_EFIRM] = max(ftree[node, T_EFIRM], fw[i, W_EFIRM])
            ftree[node, T_ESPOT] = max(ftree[node, T_ESPOT], fw[i, W_ESPOT])
            ftree[node, T_NOTICE] = max(ftree[node, T_NOTICE], fw[i, W_NOTICE])
            ftree[node, T_FIRM] = max(ftree[node, T_FIRM], fw[i, W_FIRM])
            ftree[node, T_RATE] = min(ftree[node, T_RATE], fw[i, W_RATE])
            ftree[node, T_AVAIL] = max(ftree[node, T_AVAIL], fx[i, X_AVAIL])
            ftree[node, T_PMASK] |= fx[i, X_PBIT]


@njit(cache=True)
def build_fabric_tree(fw, fx, fab_start, fab_end, fsize, ftree, only_free):
    """A max/min tree over fabrics of `_fabric_leaf`, so a multi-host search skips fabrics none of
    whose (free) whole hosts can be eligible, or that hold too few GPUs."""
    for f in range(fsize):
        _fabric_leaf(fw, fx, fab_start, fab_end, fsize, ftree, f, only_free)
    for node in range(fsize - 1, 0, -1):
        _combine(ftree, node, False)


@njit(cache=True)
def _fabric_may_fit(tier, ftree, node, now, end, mn, budget, pmask, g):
    return ftree[node, T_AVAIL] >= end and ftree[node, T_GPUS] >= g and node_may_fit(tier, ftree, node, now, end, mn, budget,
                                                         pmask)


@njit(cache=True)
def _update_dyn(dyn, size, lf, i, bit):
    _set_dyn_leaf(dyn, size, lf, i, bit)
    node = (size + i) >> 1
    while node >= 1 and _combine(dyn, node, True):
        node >>= 1


@njit(cache=True)
def _shrink_dyn(dyn, size, lf, i, bit):
    """_update_dyn after a take: while the leaf keeps free GPUs, only its free-count bit
    changes, so only the bitsets above it need recomputing."""
    f = lf[i, L_FREE]
    if f == 0:
        _update_dyn(dyn, size, lf, i, bit)
        return
    node = size + i
    dyn[node, T_MASK] = bit[min(f, 63)]
    node >>= 1
    while node >= 1:
        m = dyn[2 * node, T_MASK] | dyn[2 * node + 1, T_MASK]
        if dyn[node, T_MASK] == m:
            return  # and so are its ancestors
        dyn[node, T_MASK] = m
        node >>= 1


@njit(cache=True)
def fill_leaves(lf, rows, floor, free, gpus, host_gpus, avail, firm, cut, notice, rate, fab,
                block_id, pbit):
    """lf from the block table's columns, leaf i being table row rows[i] (L_FPOS left -1).
    Returns the leaf of each table row.  Rows are read in table order and written to their
    leaves: one scattered row write per block costs about half of gathering a dozen columns."""
    leaf_of_row = np.empty(len(rows), np.int64)
    for i in range(len(rows)):
        leaf_of_row[rows[i]] = i
    for r in range(len(rows)):
        i = leaf_of_row[r]
        lf[i, L_FLOOR] = floor[r]
        lf[i, L_FREE] = free[r]
        lf[i, L_GPUS] = gpus[r]
        lf[i, L_HOSTG] = host_gpus[r]
        lf[i, L_AVAIL] = avail[r]
        lf[i, L_FIRM] = firm[r]
        lf[i, L_CUT] = cut[r]
        lf[i, L_NOTICE] = notice[r]
        lf[i, L_RATE] = rate[r]
        lf[i, L_EFIRM] = min(avail[r], firm[r])
        lf[i, L_ESPOT] = min(avail[r], cut[r])
        lf[i, L_FAB] = fab[r]
        lf[i, L_BLOCK] = block_id[r]
        lf[i, L_ROW] = r
        lf[i, L_PBIT] = pbit[r]
        lf[i, L_FPOS] = -1
    return leaf_of_row


@njit(cache=True)
def fill_whole(lf, fab_leaf, fw, fx):
    """fw and fx rows from the leaves fab_leaf (and L_FPOS of those leaves)."""
    for j in range(len(fab_leaf)):
        i = fab_leaf[j]
        fw[j, W_FLOOR] = lf[i, L_FLOOR]
        fw[j, W_GPUS] = lf[i, L_GPUS]
        fw[j, W_FREE] = lf[i, L_FREE]
        fw[j, W_EFIRM] = lf[i, L_EFIRM]
        fw[j, W_ESPOT] = lf[i, L_ESPOT]
        fw[j, W_NOTICE] = lf[i, L_NOTICE]
        fw[j, W_RATE] = lf[i, L_RATE]
        fw[j, W_FIRM] = lf[i, L_FIRM]
        fx[j, X_AVAIL] = lf[i, L_AVAIL]
        fx[j, X_PBIT] = lf[i, L_PBIT]
        fx[j, X_LEAF] = i
        lf[i, L_FPOS] = j


@njit(cache=True)
def patch_free(lf, leaves, frees, size, dyn, bit, fw):
    """Set the free count of some leaves between ticks (the fabric structures are rebuilt from
    `fw` by prepare_multi at each tick)."""
    for r in range(len(leaves)):
        i = leaves[r]
        lf[i, L_FREE] = frees[r]
        jw = lf[i, L_FPOS]
        if jw >= 0:
            fw[jw, W_FREE] = frees[r]
        _update_dyn(dyn, size, lf, i, bit)


@njit(cache=True)
def _leaves_at_or_below(floors, n, limit):
    """Number of leaves whose floor <= limit (leaves are floor-sorted)."""
    lo = 0
    hi = n
    while lo < hi:
        mid = (lo + hi) >> 1
        if floors[mid] <= limit:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True)
def find_single(tier, now, end, mn, budget, pmask, g, limit, start, lf, floors, n, size, dyn,
                ge, le, stack):
    """Leaf minimising (floor, free, block_id) among eligible leaves with free >= g and
    floor <= limit, searching leaves >= start only.  Returns (leaf or -1, leftmost eligible leaf
    with free >= g, which is where the class's next search may start).

    Depth-first, left (cheaper) first, pruning on the aggregates.  After the first fit it only
    looks at leaves of the same floor with a strictly tighter free count (the free-count bitset
    prunes the rest); leaves are in (floor, block_id) order, so equal fits keep the lowest id.
    `floors` is lf's floor column as its own array: the floor tests touch it, not lf's rows."""
    hi = _leaves_at_or_below(floors, n, limit)
    if hi <= start:
        return -1, hi
    lo_bit = min(g, 63)
    want = ge[lo_bit]  # the free counts that may still improve on the best: [g, best_free)
    best = -1
    first = hi
    best_free = I64_MAX
    best_floor = 0
    stack[0, 0] = 1
    stack[0, 1] = 0
    stack[0, 2] = size
    sp = 1
    while sp > 0:
        sp -= 1
        node = stack[sp, 0]
        lo = stack[sp, 1]
        w = stack[sp, 2]
        if lo >= hi or lo + w <= start:
            continue
        if best >= 0 and floors[lo] > best_floor:
            continue
        if dyn[node, T_MASK] & want == 0:
            continue
        if not node_may_fit(tier, dyn, node, now, end, mn, budget, pmask):
            continue
        if w == 1:
            f = lf[lo, L_FREE]
            if f >= g and f < best_free and eligible(tier, lf, lo, now, end, mn, budget):
                if best < 0:
                    first = lo
                best = lo
                best_free = f
                best_floor = lf[lo, L_FLOOR]
                if f <= lo_bit:
                    break  # nothing is tighter than g
                want = ge[lo_bit] & le[min(f, 64) - 1]
            continue
        half = w >> 1
        stack[sp, 0] = 2 * node + 1
        stack[sp, 1] = lo + half
        stack[sp, 2] = half
        stack[sp + 1, 0] = 2 * node
        stack[sp + 1, 1] = lo
        stack[sp + 1, 2] = half
        sp += 2
    return best, first


@njit(cache=True)
def find_static(tier, now, end, mn, budget, pmask, g, lf, size, stat, stack):
    """Leftmost (lowest floor, then block_id) leaf that passes eligibility and has gpus >= g,
    ignoring floor and free, or -1."""
    stack[0, 0] = 1
    stack[0, 1] = 0
    stack[0, 2] = size
    sp = 1
    while sp > 0:
        sp -= 1
        node = stack[sp, 0]
        lo = stack[sp, 1]
        w = stack[sp, 2]
        if stat[node, T_GPUS] < g or stat[node, T_AVAIL] < end:
            continue
        if not node_may_fit(tier, stat, node, now, end, mn, budget, pmask):
            continue
        if w == 1:
            if lf[lo, L_GPUS] >= g and eligible(tier, lf, lo, now, end, mn, budget):
                return lo
            continue
        half = w >> 1
        stack[sp, 0] = 2 * node + 1
        stack[sp, 1] = lo + half
        stack[sp, 2] = half
        stack[sp + 1, 0] = 2 * node
        stack[sp + 1, 1] = lo
        stack[sp + 1, 2] = half
        sp += 2
    return -1


# ---------------------------------------------------------------------------------------------
# multi-host gangs
#
# For each gang size g in `mg` (the sizes above one host present in the book this tick) and each
# fabric f, a multi-host search needs the highest floor of the fabric's cheapest eligible whole
# free hosts holding g GPUs.  `wlb[t, fsize + f, gi]` bounds it from below: the same highest floor
# over the hosts that merely pass window threshold t (their firm or spot window, `tw_col[t]`,
# reaches `tw_end[t]`).  The thresholds are durations of the tick's multi-host bid classes (a few
# per tier, see matching.book), and a class reads the longest threshold not above its own
# duration: windows (short availability, reservations, firm windows) are what make hosts of an
# otherwise eligible fabric ineligible, and a bound that ignored them sent searches through many
# fabrics that could not win.  `wlb[t, :, gi]` is a min segment tree over fabrics, so a query
# visits fabrics cheapest bound first and stops once no bound can beat the best fabric found.
# A take that empties a whole host lists its fabric for the thresholds whose bounds counted that
# host (`_mark_window`); a threshold's listed fabrics are recomputed just before its next search
# (`_refresh_window`).  Eagerly, not when a search reaches them: stale bounds are still bounds
# (allocation only lowers free counts), but stale minima higher up sent searches through many
# stale fabrics (measured several times slower).  The fabric aggregates `fdyn` (eligibility
# maxima over each fabric's entirely free whole hosts) are built once per tick and, for the same
# reason, stay valid bounds all tick.  The static
# counterparts (`static_lb`, fabrics sorted by it in `sorder`) ignore free and serve the reasons.


@njit(cache=True)
def gang_index(mg, g):
    """Index of g in the sorted array mg, or -1."""
    lo = 0
    hi = len(mg)
    while lo < hi:
        mid = (lo + hi) >> 1
        if mg[mid] < g:
            lo = mid + 1
        else:
            hi = mid
    if lo < len(mg) and mg[lo] == g:
        return lo
    return -1


@njit(cache=True)
def _whole_free(fw, j):
    return fw[j, W_FREE] == fw[j, W_GPUS]  # fw only lists whole-host blocks


@njit(cache=True)
def prepare_multi_static(fw, fab_start, fab_end, mg):
    """Multi-host bounds that ignore free (only change with the blocks or the gang sizes):
    (static_lb, sorder)."""
    nfab = len(fab_start)
    ng = len(mg)
    static_lb = np.full((ng, nfab), I64_MAX, dtype=np.int64)
    for f in range(nfab):
        total = 0
        gi = 0
        for j in range(fab_start[f], fab_end[f]):
            if gi == ng:
                break
            total += fw[j, W_GPUS]
            while gi < ng and total >= mg[gi]:
                static_lb[gi, f] = fw[j, W_FLOOR]
                gi += 1
    sorder = np.empty((ng, nfab), dtype=np.int64)
    for gi in range(ng):
        sorder[gi, :] = np.argsort(static_lb[gi, :])
    return static_lb, sorder


@njit(cache=True)
def _wlb_climb(wlb, t, node):
    """Recompute the minima above a changed leaf of wlb[t], stopping where nothing changes."""
    ng = wlb.shape[2]
    node >>= 1
    while node >= 1:
        a = 2 * node
        changed = False
        for gi in range(ng):
            m = min(wlb[t, a, gi], wlb[t, a + 1, gi])
            if wlb[t, node, gi] != m:
                wlb[t, node, gi] = m
                changed = True
        if not changed:
            return
        node >>= 1


@njit(cache=True)
def _window_leaf(f, t, fw, fab_end, fab_first, mg, wlb, tw_col, tw_end, fsize):
    """Recompute fabric f's bounds under threshold t for every gang size (and fab_first).
    Returns whether they changed."""
    j = fab_first[f]
    stop = fab_end[f]
    while j < stop and not _whole_free(fw, j):
        j += 1
    fab_first[f] = j
    col = tw_col[t]
    reach = tw_end[t]
    node = fsize + f
    total = 0
    gi = 0
    ng = len(mg)
    changed = False
    while j < stop and gi < ng:
        if _whole_free(fw, j) and fw[j, col] >= reach:
            total += fw[j, W_GPUS]
            while gi < ng and total >= mg[gi]:
                changed |= wlb[t, node, gi] != fw[j, W_FLOOR]
                wlb[t, node, gi] = fw[j, W_FLOOR]
                gi += 1
        j += 1
    while gi < ng:
        changed |= wlb[t, node, gi] != I64_MAX
        wlb[t, node, gi] = I64_MAX
        gi += 1
    return changed


@njit(cache=True)
def build_window_bounds(fw, fab_start, fab_end, fab_first, mg, wlb, tw_col, tw_end, fsize,
                        wtop):
    """Per-tick multi-host bounds (see above) from the current free counts, and wtop (see
    _mark_window)."""
    nfab = len(fab_start)
    for f in range(nfab):
        fab_first[f] = fab_start[f]
    for t in range(len(tw_col)):
        for f in range(nfab):
            _window_leaf(f, t, fw, fab_end, fab_first, mg, wlb, tw_col, tw_end, fsize)
            if len(mg) > 0:
                wtop[f, t] = wlb[t, fsize + f, len(mg) - 1]
        for node in range(fsize + nfab, 2 * fsize):
            for gi in range(len(mg)):
                wlb[t, node, gi] = I64_MAX
        for node in range(fsize - 1, 0, -1):
            for gi in range(len(mg)):
                wlb[t, node, gi] = min(wlb[t, 2 * node, gi], wlb[t, 2 * node + 1, gi])


@njit(cache=True)
def _mark_window(lf, i, f, wtop, tw_col, tw_end, stale):
    """Leaf i, a whole host of fabric f, stops being entirely free: list f as stale for each
    threshold whose bounds counted it (it passes the threshold's window and its floor is not
    above the bound of the largest gang size, `wtop[f, t]`: a copy of those leaves side by side,
    as a take reads them all).  stale[t, nfab] counts the fabrics listed in stale[t, :]; bit t
    of stale[T, f] says f is listed for t."""
    nt = len(tw_col)
    nfab = stale.shape[1] - 1
    fl = lf[i, L_FLOOR]
    listed = stale[nt, f]
    for t in range(nt):
        if (listed >> t) & 1 or lf[i, tw_col[t]] < tw_end[t] or fl > wtop[f, t]:
            continue
        listed |= np.int64(1) << t
        stale[t, stale[t, nfab]] = f
        stale[t, nfab] += 1
    stale[nt, f] = listed


@njit(cache=True)
def _refresh_window(t, fw, fab_end, fab_first, mg, wlb, tw_col, tw_end, fsize, stale, wtop):
    """Bring threshold t's bounds up to date (before a search reads them)."""
    nfab = stale.shape[1] - 1
    unmark = ~(np.int64(1) << t)
    last = wlb.shape[2] - 1
    for r in range(stale[t, nfab]):
        f = stale[t, r]
        stale[len(tw_col), f] &= unmark
        if _window_leaf(f, t, fw, fab_end, fab_first, mg, wlb, tw_col, tw_end, fsize):
            _wlb_climb(wlb, t, fsize + f)
            wtop[f, t] = wlb[t, fsize + f, last]
    stale[t, nfab] = 0


@njit(cache=True)
def _loses_tie(node, fsize, fid, best_f, best_cnt, min_cnt):
    """Whether no fabric under `node`, at a highest floor equal to the best's, can win the tie:
    it would need fewer hosts, and the best already has the fewest any fabric can (min_cnt), or a
    lower fabric_id, and every fabric under node has a higher one (`fid[node]`: the lowest
    fabric_id under node).  Floors are whole cents, so many fabrics share a bound: without this,
    each would be looked at."""
    return best_cnt == min_cnt and fid[node] > fid[fsize + best_f]


@njit(cache=True)
def _beats(fl, cnt, node, best_hf, best_cnt, best_f, fid, fsize):
    """Whether fabric leaf `node` with (highest floor fl, cnt hosts) is better than the best so
    far: lower highest floor, then fewer hosts, then lower fabric_id."""
    if fl != best_hf:
        return fl < best_hf
    if cnt != best_cnt:
        return cnt < best_cnt
    return fid[node] < fid[fsize + best_f]


@njit(cache=True)
def find_multi(tier, now, end, mn, budget, pmask, g, gi, t, limit, min_cnt,
               fw, fab_end, fab_first, wlb, fsize, fdyn, fid, stack):
    """Fabric whose cheapest whole free eligible hosts hold g GPUs with the lowest highest floor,
    then fewest hosts, then lowest fabric_id; -1 if none.  `t`: the class's window threshold;
    `min_cnt`: the fewest hosts any fabric could use."""
    best_f = -1
    best_hf = I64_MAX
    best_cnt = 0
    stack[0, 0] = 1
    sp = 1
    while sp > 0:
        sp -= 1
        node = stack[sp, 0]
        v = wlb[t, node, gi]
        if v > limit or v > best_hf:
            continue
        if v == best_hf and _loses_tie(node, fsize, fid, best_f, best_cnt, min_cnt):
            continue
        if not _fabric_may_fit(tier, fdyn, node, now, end, mn, budget, pmask, g):
            continue
        if node < fsize:
            # Visit the child with the lower bound first (it is pushed last); a child whose
            # bound already exceeds the limit or the best is not pushed at all.
            lo_child = 2 * node
            hi_child = lo_child + 1
            if wlb[t, hi_child, gi] < wlb[t, lo_child, gi]:
                lo_child, hi_child = hi_child, lo_child
            w = wlb[t, hi_child, gi]
            if w <= limit and w <= best_hf:
                stack[sp, 0] = hi_child
                sp += 1
            w = wlb[t, lo_child, gi]
            if w <= limit and w <= best_hf:
                stack[sp, 0] = lo_child
                sp += 1
            continue
        f = node - fsize
        total = 0
        cnt = 0
        for j in range(fab_first[f], fab_end[f]):
            fl = fw[j, W_FLOOR]
            if fl > limit or fl > best_hf:
                break
            if not _whole_free(fw, j):
                continue
            if not eligible(tier, fw, j, now, end, mn, budget):
                continue
            total += fw[j, W_GPUS]
            cnt += 1
            if total >= g:
                if _beats(fl, cnt, node, best_hf, best_cnt, best_f, fid, fsize):
                    best_f = f
                    best_hf = fl
                    best_cnt = cnt
                break
    return best_f


@njit(cache=True)
def need_multi_static(tier, now, end, mn, budget, pmask, g, gi, fw, fab_start, fab_end,
                      static_lb, sorder, fsize, ftree):
    """Lowest floor at which one fabric's whole hosts (eligible, ignoring free) hold g GPUs."""
    best = -1
    for r in range(sorder.shape[1]):
        f = sorder[gi, r]
        lb = static_lb[gi, f]
        if lb == I64_MAX or (best >= 0 and lb >= best):
            break
        if not _fabric_may_fit(tier, ftree, fsize + f, now, end, mn, budget, pmask, g):
            continue
        total = 0
        for j in range(fab_start[f], fab_end[f]):
            i = j
            fl = fw[i, W_FLOOR]
            if best >= 0 and fl >= best:
                break
            if not eligible(tier, fw, i, now, end, mn, budget):
                continue
            total += fw[i, W_GPUS]
            if total >= g:
                best = fl
                break
    return best


# ---------------------------------------------------------------------------------------------
# structural reasons (per class, per tick)


@njit(cache=True)
def _notice_window(nv, nbest, mn):
    """Largest spot window among blocks with notice_s >= mn."""
    lo = 0
    hi = len(nv)
    while lo < hi:
        mid = (lo + hi) >> 1
        if nv[mid] < mn:
            lo = mid + 1
        else:
            hi = mid
    if lo == len(nv):
        return I64_MIN
    return nbest[lo]


@njit(cache=True)
def multi_exists(tier, now, end, mn, budget, pmask, g, gi, fw, fab_start, fab_end,
                 static_lb, sorder, fsize, ftree):
    """Whether some fabric's eligible whole hosts (ignoring free and floor) hold g GPUs."""
    for r in range(sorder.shape[1]):
        f = sorder[gi, r]
        if static_lb[gi, f] == I64_MAX:
            return False  # this fabric, and every later one, is too small even when all eligible
        if not _fabric_may_fit(tier, ftree, fsize + f, now, end, mn, budget, pmask, g):
            continue
        total = 0
        for j in range(fab_start[f], fab_end[f]):
            i = j
            if eligible(tier, fw, i, now, end, mn, budget):
                total += fw[i, W_GPUS]
                if total >= g:
                    return True
    return False


@njit(cache=True)
def class_reason(
    tier, now, tick, c, cls_key, cls_st, max_host,
    lf, size, stat, nv, nbest, fab_start, fab_end, fw, mg, static_lb, sorder,
    fsize, ftree, prof_notice, prof_rate, stack,
):
    """Fill cls_st[c, CODE] for this tick: reason 1-6 of the rule, or 0 when structurally
    eligible.  For single-host classes NEED comes for free and is filled too.  Returns CODE."""
    if cls_st[c, C_STAMP] == tick:
        return cls_st[c, C_CODE]
    end = now + cls_key[c, K_DUR]
    mn = cls_key[c, K_MN]
    budget = cls_key[c, K_BUDGET]
    g = cls_key[c, K_GPUS]
    pmask = profile_masks(tier, now, tick, c, cls_key, cls_st, prof_notice, prof_rate)
    code = 0
    if stat[1, T_AVAIL] < end:
        code = R_NO_SUPPLY_WINDOW
    elif tier == FIRM and stat[1, T_EFIRM] < end:
        code = R_NO_FIRM_WINDOW
    elif tier == SPOT and stat[1, T_ESPOT] < end:
        code = R_RESERVATION
    elif tier == SPOT and _notice_window(nv, nbest, mn) < end:
        code = R_NOTICE_TOO_LONG
    elif tier == SPOT and find_static(tier, now, end, mn, budget, pmask, 0, lf, size, stat, stack) < 0:
        code = R_SURVIVAL_TOO_HIGH
    elif g > max_host:
        if not multi_exists(tier, now, end, mn, budget, pmask, g, gang_index(mg, g), fw,
                            fab_start, fab_end, static_lb, sorder, fsize, ftree):
            code = R_TOO_LARGE
    else:
        leaf = find_static(tier, now, end, mn, budget, pmask, g, lf, size, stat, stack)
        if leaf < 0:
            code = R_TOO_LARGE
        else:
            cls_st[c, C_NEED] = lf[leaf, L_FLOOR]
            cls_st[c, C_NSTAMP] = tick
    cls_st[c, C_STAMP] = tick
    cls_st[c, C_CODE] = code
    return code


@njit(cache=True)
def class_need(tier, now, tick, c, cls_key, cls_st, lf, fab_start, fab_end, fw, mg,
               static_lb, sorder, fsize, ftree, prof_notice, prof_rate):
    """The lowest floor at which a structurally eligible class could fit (for BELOW_FLOOR).
    Multi-host classes compute it only here, on demand: it is rarely needed and costs a search
    over fabrics."""
    if cls_st[c, C_NSTAMP] == tick:
        return cls_st[c, C_NEED]
    g = cls_key[c, K_GPUS]
    pmask = profile_masks(tier, now, tick, c, cls_key, cls_st, prof_notice, prof_rate)
    need = need_multi_static(
        tier, now, now + cls_key[c, K_DUR], cls_key[c, K_MN], cls_key[c, K_BUDGET], pmask, g,
        gang_index(mg, g), fw, fab_start, fab_end, static_lb, sorder, fsize, ftree,
    )
    cls_st[c, C_NEED] = need
    cls_st[c, C_NSTAMP] = tick
    return need


# ---------------------------------------------------------------------------------------------
# the allocation (both tiers in one price-time priority walk)


@njit(cache=True)
def _take(lf, i, give, size, dyn, bit, fw, wtop, tw_col, tw_end, stale):
    """Take `give` GPUs of leaf i.  When a whole host stops being entirely free, its fabric's
    multi-host bounds go stale (`_mark_window`): they are brought up to date before the next
    search that reads them."""
    was_whole_free = lf[i, L_FREE] == lf[i, L_GPUS] and lf[i, L_GPUS] == lf[i, L_HOSTG]
    lf[i, L_FREE] -= give
    jw = lf[i, L_FPOS]
    if jw >= 0:
        fw[jw, W_FREE] = lf[i, L_FREE]
    _shrink_dyn(dyn, size, lf, i, bit)
    if was_whole_free:
        _mark_window(lf, i, lf[i, L_FAB], wtop, tw_col, tw_end, stale)


@njit(cache=True)
def lowest_free_floor(lf, size, dyn):
    """Floor of the leftmost leaf with free GPUs (the lowest floor among them), or I64_MAX."""
    if dyn[1, T_MASK] == 0:
        return I64_MAX
    node = 1
    while node < size:
        node = 2 * node if dyn[2 * node, T_MASK] != 0 else 2 * node + 1
    return lf[node - size, L_FLOOR]


# Per-tier figures of a walk: ts[tier, X].
S_WINNERS = 0
S_MAX_FLOOR = 1
S_LOWEST_WIN = 2
S_HIGHEST_LOSE = 3  # highest losing structurally eligible limit, or -1 (TickResult.competing_limit)
NS = 4


@njit(cache=True)
def clear_book(
    now, tick, max_host,
    m_bid, m_limit, m_seq, m_cls, m_state, m_idst, m_rank,
    p_bid, p_limit, p_seq, p_cls, p_state, p_idst, p_rank,
    cls_key, cls_st,
    lf, floors, n, size, dyn, stat, bit, ge, le,
    fab_start, fab_end, fw, fx, nv, nbest,
    mg, fab_first, wlb, wtop, tw_col, tw_end, cls_t, fsize, ftree, fdyn, fid, static_lb,
    sorder, prof_notice, prof_rate, ecls, dom_ptr, dom_idx, fail_single, fail_multi,
    fill_bid, fill_block, fill_gpus, fill_tier, ts,
):
    """Walk the live bids of both tiers in price-time priority (merging the main run and the
    pending run on the fly) and allocate; each tier keeps its own max_floor (its own uniform
    price).  Winners get state WON.  Returns the number of fills; the per-tier figures go to
    ts[tier, S_*].

    Leaves are floor-sorted, so no bid whose limit is below the lowest floor of the blocks with
    free GPUs (`lff`, which only rises during the tick) can be placed, nor (rule 1) one below
    its tier's `max_floor`; bids come in descending limit, so from the first such bid of a tier
    on every bid of that tier loses: once the tier's `highest_lose` is known it is done, and the
    walk stops when both are (emit_losers reports the losers)."""
    stack = np.empty((256, 3), dtype=np.int64)
    stale = np.zeros((len(tw_col) + 1, len(fab_start) + 1), np.int64)  # see _mark_window
    lff = lowest_free_floor(lf, size, dyn)
    lf_stale = False
    for t in range(2):
        ts[t, S_WINNERS] = 0
        ts[t, S_MAX_FLOOR] = 0
        ts[t, S_LOWEST_WIN] = I64_MAX
        ts[t, S_HIGHEST_LOSE] = -1
    done = np.zeros(2, np.bool_)  # per tier: its price can no longer change
    nf = 0
    i = 0
    j = 0
    nm = len(m_limit)
    npend = len(p_limit)
    while i < nm or j < npend:
        from_main = j >= npend or (
            i < nm and (m_limit[i] > p_limit[j] or (m_limit[i] == p_limit[j] and m_seq[i] < p_seq[j]))
        )
        if from_main:
            k = i
            i += 1
            if m_state[k] != STATE_LIVE:
                continue
            lim = m_limit[k]
            c = m_cls[k]
            bid_id = m_bid[k]
        else:
            k = j
            j += 1
            if p_state[k] != STATE_LIVE:
                continue
            lim = p_limit[k]
            c = p_cls[k]
            bid_id = p_bid[k]
        tier = bid_id & 1  # internal ids are bid_id * 2 + tier (see matching.book)
        if done[tier]:
            continue
        won = False
        g = cls_key[c, K_GPUS]
        e = ecls[c]
        max_floor = ts[tier, S_MAX_FLOOR]
        if lim < lff or lim < max_floor:
            # Rule 1, or nothing with free GPUs is cheap enough: this bid loses, and so does
            # every later one of its tier (no higher limit; lff and max_floor only rise).
            if ts[tier, S_HIGHEST_LOSE] >= 0:
                done[tier] = True
                if done[FIRM] and done[SPOT]:
                    break
                continue
        elif g < (fail_single[e] if g <= max_host else fail_multi[e]):
            end = now + cls_key[c, K_DUR]
            mn = cls_key[c, K_MN]
            budget = cls_key[c, K_BUDGET]
            pmask = profile_masks(tier, now, tick, c, cls_key, cls_st, prof_notice, prof_rate)
            if g <= max_host:
                start = cls_st[c, C_CURSOR] if cls_st[c, C_CSTAMP] == tick else 0
                leaf, first = find_single(tier, now, end, mn, budget, pmask, g, lim, start,
                                          lf, floors, n, size, dyn, ge, le, stack)
                cls_st[c, C_CURSOR] = first
                cls_st[c, C_CSTAMP] = tick
                if leaf >= 0:
                    _take(lf, leaf, g, size, dyn, bit, fw, wtop, tw_col, tw_end, stale)
                    # lff only moves when a block at that floor runs out of free GPUs.
                    lf_stale = lf[leaf, L_FREE] == 0 and lf[leaf, L_FLOOR] == lff
                    fill_bid[nf] = bid_id
                    fill_block[nf] = lf[leaf, L_BLOCK]
                    fill_gpus[nf] = g
                    fill_tier[nf] = tier
                    nf += 1
                    max_floor = max(max_floor, lf[leaf, L_FLOOR])
                    won = True
            else:
                t = cls_t[c]
                _refresh_window(t, fw, fab_end, fab_first, mg, wlb, tw_col, tw_end, fsize, stale, wtop)
                f = find_multi(tier, now, end, mn, budget, pmask, g, gang_index(mg, g), t, lim,
                               (g + max_host - 1) // max_host, fw, fab_end, fab_first, wlb,
                               fsize, fdyn, fid, stack)
                if f >= 0:
                    lf_stale = True
                    remaining = g
                    for jj in range(fab_first[f], fab_end[f]):
                        if not _whole_free(fw, jj):
                            continue
                        if not eligible(tier, fw, jj, now, end, mn, budget):
                            continue
                        leaf = fx[jj, X_LEAF]
                        give = min(remaining, lf[leaf, L_GPUS])
                        _take(lf, leaf, give, size, dyn, bit, fw, wtop, tw_col, tw_end, stale)
                        fill_bid[nf] = bid_id
                        fill_block[nf] = lf[leaf, L_BLOCK]
                        fill_gpus[nf] = give
                        fill_tier[nf] = tier
                        nf += 1
                        max_floor = max(max_floor, lf[leaf, L_FLOOR])
                        remaining -= give
                        if remaining == 0:
                            break
                    won = True
            if not won:
                # Free GPUs only shrink and later bids have no higher limit, so no later bid
                # of this eligibility class, or of one whose eligible blocks are a subset of
                # its (dom_idx), fits with this many GPUs or more.
                fail = fail_single if g <= max_host else fail_multi
                for q in range(dom_ptr[e], dom_ptr[e + 1]):
                    d = dom_idx[q]
                    if g < fail[d]:
                        fail[d] = g
        if won:
            ts[tier, S_MAX_FLOOR] = max_floor
            if from_main:
                m_state[k] = STATE_WON
                m_idst[m_rank[k]] = STATE_WON
            else:
                p_state[k] = STATE_WON
                p_idst[p_rank[k]] = STATE_WON
            if lf_stale:
                lff = lowest_free_floor(lf, size, dyn)
                lf_stale = False
            ts[tier, S_WINNERS] += 1
            ts[tier, S_LOWEST_WIN] = min(ts[tier, S_LOWEST_WIN], lim)
        elif ts[tier, S_HIGHEST_LOSE] < 0:
            # Bids come in descending limit: the first structurally eligible loser sets it.
            class_reason(
                tier, now, tick, c, cls_key, cls_st, max_host,
                lf, size, stat, nv, nbest, fab_start, fab_end, fw, mg, static_lb, sorder,
                fsize, ftree, prof_notice, prof_rate, stack,
            )
            if cls_st[c, C_CODE] == 0:
                ts[tier, S_HIGHEST_LOSE] = lim
    return nf


@njit(cache=True)
def emit_losers(
    now, tick, prices, max_host, n_cls,
    m_ids, m_pos, m_lim, m_cls, m_state, m_idst,
    p_ids, p_pos, p_lim, p_cls, p_state, p_idst,
    cls_key, cls_st,
    lf, size, stat, nv, nbest, fab_start, fab_end, fw, mg, static_lb, sorder,
    fsize, ftree, prof_notice, prof_rate, out_bid, out_code, out_short, nout, hs,
):
    """Reasons of the losing bids, per tier in bid_id order (rows of out_*, nout[tier] of
    them); retires this tick's winners (WON -> DEAD).  `prices[tier]` is the tier's clearing
    price, or its indicative price when nothing traded.  Reads only the id-ordered arrays (one
    sequential pass).  Also folds the losers into their tier's state hash `hs[tier]`
    (docs/matching.md, Determinism).

    It visits every resting bid each tick, so the loop is kept tight: the structural reason of
    every class is worked out first (a few thousand classes cost about what doing it on demand
    costs, and keeps that work out of the loop), per-class answers live in small local arrays,
    and the two tiers' counters and hashes are kept in locals."""
    stack = np.empty((256, 3), dtype=np.int64)
    ccode = np.empty(n_cls, np.int64)  # reason 1-6, or 0
    for c in range(n_cls):
        ccode[c] = class_reason(
            cls_key[c, K_TIER], now, tick, c, cls_key, cls_st, max_host,
            lf, size, stat, nv, nbest, fab_start, fab_end, fw, mg, static_lb, sorder,
            fsize, ftree, prof_notice, prof_rate, stack,
        )
    price0 = prices[0]
    price1 = prices[1]
    n0 = 0
    n1 = 0
    h0 = hs[0]
    h1 = hs[1]
    i = 0
    j = 0
    nm = len(m_ids)
    npend = len(p_ids)
    nxt = p_ids[0] if npend > 0 else I64_MAX
    while True:
        if i < nm and m_ids[i] < nxt:
            st = m_idst[i]
            if st != STATE_LIVE:
                if st == STATE_WON:
                    m_idst[i] = STATE_DEAD
                    m_state[m_pos[i]] = STATE_DEAD
                i += 1
                continue
            bid_id = m_ids[i]
            lim = m_lim[i]
            c = m_cls[i]
            i += 1
        elif j < npend:
            st = p_idst[j]
            bid_id = p_ids[j]
            lim = p_lim[j]
            c = p_cls[j]
            if st == STATE_WON:
                p_idst[j] = STATE_DEAD
                p_state[p_pos[j]] = STATE_DEAD
            j += 1
            nxt = p_ids[j] if j < npend else I64_MAX
            if st != STATE_LIVE:
                continue
        else:
            break
        code = ccode[c]
        tier = bid_id & 1  # internal ids are bid_id * 2 + tier (see matching.book)
        price = price1 if tier == SPOT else price0
        short = 0
        if code == 0:
            if lim < price:
                code = R_LIMIT_BELOW_PRICE
                short = price - lim
            else:
                # Rare (a loser above the price); class_need keeps its answer for the tick.
                need = class_need(tier, now, tick, c, cls_key, cls_st, lf, fab_start, fab_end,
                                  fw, mg, static_lb, sorder, fsize, ftree, prof_notice,
                                  prof_rate)
                code = R_BELOW_FLOOR if lim < need else R_NO_CAPACITY
        spot = tier == SPOT
        r = n1 if spot else n0
        out_bid[tier, r] = bid_id >> 1  # the caller's bid_id (see matching.book)
        out_code[tier, r] = code
        out_short[tier, r] = short
        h = h1 if spot else h0
        h = (h ^ np.uint64(bid_id >> 1)) * FNV_PRIME
        h = (h ^ np.uint64(code)) * FNV_PRIME
        h = (h ^ np.uint64(short)) * FNV_PRIME
        if spot:
            n1 += 1
            h1 = h
        else:
            n0 += 1
            h0 = h
    nout[0] = n0
    nout[1] = n1
    hs[0] = h0
    hs[1] = h1


@njit(cache=True)
def split_fills(fill_bid, fill_block, fill_gpus, fill_tier):
    """The fills of each tier, in fill order, with the caller's bid ids (see matching.book):
    (bid, block, gpus) of firm, then of spot."""
    n1 = 0
    for r in range(len(fill_tier)):
        if fill_tier[r] == SPOT:
            n1 += 1
    n0 = len(fill_tier) - n1
    out = ((np.empty(n0, np.int64), np.empty(n0, np.int64), np.empty(n0, np.int32)),
           (np.empty(n1, np.int64), np.empty(n1, np.int64), np.empty(n1, np.int32)))
    k0 = 0
    k1 = 0
    for r in range(len(fill_tier)):
        if fill_tier[r] == FIRM:
            o = out[0]
            k = k0
            k0 += 1
        else:
            o = out[1]
            k = k1
            k1 += 1
        o[0][k] = fill_bid[r] >> 1
        o[1][k] = fill_block[r]
        o[2][k] = fill_gpus[r]
    return out


@njit(cache=True)
def hash_head(fill_bid, fill_block, fill_gpus, price, indicative):
    """The state hash up to the losers: fills, price, indicative."""
    h = FNV_OFFSET
    for r in range(len(fill_bid)):
        h = (h ^ np.uint64(fill_bid[r])) * FNV_PRIME
        h = (h ^ np.uint64(fill_block[r])) * FNV_PRIME
        h = (h ^ np.uint64(fill_gpus[r])) * FNV_PRIME
    h = (h ^ np.uint64(price)) * FNV_PRIME
    h = (h ^ np.uint64(indicative)) * FNV_PRIME
    return h


@njit(cache=True)
def hash_tail(h, outbid):
    """The state hash after the losers: the outbid lease ids."""
    for r in range(len(outbid)):
        h = (h ^ np.uint64(outbid[r])) * FNV_PRIME
    return h


@njit(cache=True)
def state_hash(fill_bid, fill_block, fill_gpus, price, indicative, l_bid, l_code, l_short, outbid):
    """64-bit FNV-1a over 64-bit words (docs/matching.md, Determinism)."""
    h = FNV_OFFSET
    for r in range(len(fill_bid)):
        h = (h ^ np.uint64(fill_bid[r])) * FNV_PRIME
        h = (h ^ np.uint64(fill_block[r])) * FNV_PRIME
        h = (h ^ np.uint64(fill_gpus[r])) * FNV_PRIME
    h = (h ^ np.uint64(price)) * FNV_PRIME
    h = (h ^ np.uint64(indicative)) * FNV_PRIME
    for r in range(len(l_bid)):
        h = (h ^ np.uint64(l_bid[r])) * FNV_PRIME
        h = (h ^ np.uint64(l_code[r])) * FNV_PRIME
        h = (h ^ np.uint64(l_short[r])) * FNV_PRIME
    for r in range(len(outbid)):
        h = (h ^ np.uint64(outbid[r])) * FNV_PRIME
    return h


# ---------------------------------------------------------------------------------------------
# bid runs: merging sorted runs, class assignment


@njit(cache=True)
def merge_runs(
    a_bid, a_lim, a_seq, a_cls, a_state, a_ids, a_pos,
    b_bid, b_lim, b_seq, b_cls, b_state, b_ids, b_pos,
):
    """Merge the live bids of two runs into one run (priority order and bid_id order)."""
    na = len(a_lim)
    nb = len(b_lim)
    total = 0
    for k in range(na):
        if a_state[k] == STATE_LIVE:
            total += 1
    for k in range(nb):
        if b_state[k] == STATE_LIVE:
            total += 1
    bid = np.empty(total, np.int64)
    lim = np.empty(total, np.int64)
    seq = np.empty(total, np.int64)
    cls = np.empty(total, np.int32)
    state = np.full(total, STATE_LIVE, np.int8)
    new_a = np.full(na, -1, np.int64)
    new_b = np.full(nb, -1, np.int64)
    i = 0
    j = 0
    o = 0
    while i < na or j < nb:
        take_a = j >= nb or (
            i < na and (a_lim[i] > b_lim[j] or (a_lim[i] == b_lim[j] and a_seq[i] < b_seq[j]))
        )
        if take_a:
            if a_state[i] == STATE_LIVE:
                bid[o] = a_bid[i]
                lim[o] = a_lim[i]
                seq[o] = a_seq[i]
                cls[o] = a_cls[i]
                new_a[i] = o
                o += 1
            i += 1
        else:
            if b_state[j] == STATE_LIVE:
                bid[o] = b_bid[j]
                lim[o] = b_lim[j]
                seq[o] = b_seq[j]
                cls[o] = b_cls[j]
                new_b[j] = o
                o += 1
            j += 1
    ids = np.empty(total, np.int64)
    pos = np.empty(total, np.int32)
    id_lim = np.empty(total, np.int64)
    id_cls = np.empty(total, np.int32)
    id_state = np.full(total, STATE_LIVE, np.int8)
    rank = np.empty(total, np.int32)
    i = 0
    j = 0
    o = 0
    while i < na or j < nb:
        if j >= nb or (i < na and a_ids[i] < b_ids[j]):
            p = new_a[a_pos[i]]
            i += 1
        else:
            p = new_b[b_pos[j]]
            j += 1
        if p < 0:
            continue
        ids[o] = bid[p]
        pos[o] = p
        rank[p] = o
        id_lim[o] = lim[p]
        id_cls[o] = cls[p]
        o += 1
    return bid, lim, seq, cls, state, ids, pos, id_lim, id_cls, id_state, rank


@njit(cache=True)
def _slot(keys, r, mask):
    h = np.uint64(0x9E3779B97F4A7C15)
    for q in range(NK):
        h = (h ^ np.uint64(keys[r, q])) * np.uint64(0xBF58476D1CE4E5B9)
        h = h ^ (h >> np.uint64(31))
    return np.int64(h & np.uint64(mask))


@njit(cache=True)
def assign_classes(keys, start, hkeys, hvals, n_cls, cls_key, out):
    """Class id of each row of keys (open addressing).  Stops early when the table is half full
    or cls_key is full; returns (next row, class count) so the caller can grow and resume."""
    cap = len(hvals)
    mask = cap - 1
    for r in range(start, len(keys)):
        if 2 * (n_cls + 1) > cap or n_cls >= len(cls_key):
            return r, n_cls
        h = _slot(keys, r, mask)
        while True:
            v = hvals[h]
            if v < 0:
                for q in range(NK):
                    hkeys[h, q] = keys[r, q]
                    cls_key[n_cls, q] = keys[r, q]
                hvals[h] = n_cls
                out[r] = n_cls
                n_cls += 1
                break
            same = True
            for q in range(NK):
                if hkeys[h, q] != keys[r, q]:
                    same = False
                    break
            if same:
                out[r] = v
                break
            h = (h + 1) & mask
    return len(keys), n_cls


@njit(cache=True)
def rehash_classes(cls_key, n_cls, hkeys, hvals):
    mask = len(hvals) - 1
    for c in range(n_cls):
        h = _slot(cls_key, c, mask)
        while hvals[h] >= 0:
            h = (h + 1) & mask
        for q in range(NK):
            hkeys[h, q] = cls_key[c, q]
        hvals[h] = c
