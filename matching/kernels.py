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
* Fabrics: `fab_leaf[fab_start[f]:fab_end[f]]` are the leaves of fabric f (dense index, in
  fabric_id order) whose block is a whole host (gpus == host_gpus), in (floor, block_id) order.
* Bid classes: bids with the same (duration_s, min_notice_s, hazard_budget, gpus) are eligible on
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

# lf columns
L_FLOOR = 0
L_FREE = 1
L_GPUS = 2
L_HOSTG = 3
L_AVAIL = 4
L_FIRM = 5
L_CUT = 6
L_NOTICE = 7
L_RATE = 8
L_EFIRM = 9  # min(available_until, firm_until): the end a firm bid may reach
L_ESPOT = 10  # min(available_until, cut_at): the end a spot bid may reach
L_FAB = 11  # dense fabric index
L_BLOCK = 12  # block_id
L_ROW = 13  # row in the BlockTable
NL = 14

# tree columns (shared positions 1-5 between dyn and stat so one test serves both)
T_MASK = 0  # dyn: bitset of free counts
T_GPUS = 0  # stat: max gpus
T_EFIRM = 1
T_ESPOT = 2
T_NOTICE = 3
T_FIRM = 4
T_RATE = 5  # min
T_AVAIL = 6  # stat only
NT = 8

# cls_key columns
K_DUR = 0
K_MN = 1
K_BUDGET = 2
K_GPUS = 3
NK = 4

# cls_st columns (per tick)
C_STAMP = 0  # tick number in which CODE/NEED were computed
C_CODE = 1  # 0 = structurally eligible, else reason 1-6
C_NEED = 2  # lowest floor at which it would fit (when CODE == 0)
C_DEAD = 3  # tick number in which an allocation query failed: nothing fits for the rest of it
NC = 4

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


def mask_tables():
    """BIT[b] = 1 << b, GE[b] = bits >= b, LE[b] = bits <= b, as int64 bit patterns."""
    bit = np.array([1 << b for b in range(64)], dtype=np.uint64)
    ge = np.array([((1 << 64) - 1) ^ ((1 << b) - 1) for b in range(65)], dtype=np.uint64)
    le = np.array([(1 << (b + 1)) - 1 for b in range(64)], dtype=np.uint64)
    return bit.view(np.int64), ge.view(np.int64), le.view(np.int64)


# ---------------------------------------------------------------------------------------------
# eligibility


@njit(cache=True)
def leaf_eligible(tier, lf, i, now, end, mn, budget):
    """The rule's eligibility of a bid on block i, without floor and free."""
    if lf[i, L_AVAIL] < end:
        return False
    if tier == FIRM:
        return lf[i, L_FIRM] >= end
    if lf[i, L_CUT] < end or lf[i, L_NOTICE] < mn:
        return False
    x = end - max(now, lf[i, L_FIRM])
    return x <= 0 or lf[i, L_RATE] * x <= budget


@njit(cache=True)
def node_may_fit(tier, t, node, now, end, mn, budget):
    """False when no leaf under `node` can pass eligibility (aggregates are upper bounds)."""
    if tier == FIRM:
        return t[node, T_EFIRM] >= end
    if t[node, T_ESPOT] < end or t[node, T_NOTICE] < mn:
        return False
    x = end - max(now, t[node, T_FIRM])
    return x <= 0 or t[node, T_RATE] * x <= budget


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


@njit(cache=True)
def _set_leaf_values(t, node, lf, i):
    t[node, T_EFIRM] = lf[i, L_EFIRM]
    t[node, T_ESPOT] = lf[i, L_ESPOT]
    t[node, T_NOTICE] = lf[i, L_NOTICE]
    t[node, T_FIRM] = lf[i, L_FIRM]
    t[node, T_RATE] = lf[i, L_RATE]
    t[node, T_AVAIL] = lf[i, L_AVAIL]


@njit(cache=True)
def _combine(t, node, is_dyn):
    a = 2 * node
    b = a + 1
    if is_dyn:
        t[node, T_MASK] = t[a, T_MASK] | t[b, T_MASK]
    else:
        t[node, T_GPUS] = max(t[a, T_GPUS], t[b, T_GPUS])
    t[node, T_EFIRM] = max(t[a, T_EFIRM], t[b, T_EFIRM])
    t[node, T_ESPOT] = max(t[a, T_ESPOT], t[b, T_ESPOT])
    t[node, T_NOTICE] = max(t[a, T_NOTICE], t[b, T_NOTICE])
    t[node, T_FIRM] = max(t[a, T_FIRM], t[b, T_FIRM])
    t[node, T_RATE] = min(t[a, T_RATE], t[b, T_RATE])
    t[node, T_AVAIL] = max(t[a, T_AVAIL], t[b, T_AVAIL])


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
def rebuild_dyn(lf, n, size, dyn, bit):
    """Refresh the free-dependent aggregates after `free` changed outside a tick."""
    for i in range(size):
        if i < n:
            _set_dyn_leaf(dyn, size, lf, i, bit)
        else:
            _set_identity(dyn, size + i)
    for node in range(size - 1, 0, -1):
        _combine(dyn, node, True)


@njit(cache=True)
def _update_dyn(dyn, size, lf, i, bit):
    _set_dyn_leaf(dyn, size, lf, i, bit)
    node = (size + i) >> 1
    while node >= 1:
        _combine(dyn, node, True)
        node >>= 1


@njit(cache=True)
def _leaves_at_or_below(lf, n, limit):
    """Number of leaves whose floor <= limit (leaves are floor-sorted)."""
    lo = 0
    hi = n
    while lo < hi:
        mid = (lo + hi) >> 1
        if lf[mid, L_FLOOR] <= limit:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True)
def find_single(tier, now, end, mn, budget, g, limit, lf, n, size, dyn, ge, le, stack):
    """Leaf minimising (floor, free, block_id) among eligible leaves with free >= g and
    floor <= limit, or -1.  Depth-first, left (cheaper) first, pruning on the aggregates."""
    hi = _leaves_at_or_below(lf, n, limit)
    if hi == 0:
        return -1
    lo_bit = min(g, 63)
    best = -1
    best_free = I64_MAX
    best_floor = 0
    sp = 0
    stack[0, 0] = 1
    stack[0, 1] = 0
    stack[0, 2] = size
    sp = 1
    while sp > 0:
        sp -= 1
        node = stack[sp, 0]
        lo = stack[sp, 1]
        w = stack[sp, 2]
        if lo >= hi:
            continue
        if best >= 0 and lf[lo, L_FLOOR] > best_floor:
            continue
        hi_bit = 63 if best_free > 63 else best_free - 1
        if lo_bit > hi_bit:
            break
        if dyn[node, T_MASK] & ge[lo_bit] & le[hi_bit] == 0:
            continue
        if not node_may_fit(tier, dyn, node, now, end, mn, budget):
            continue
        if w == 1:
            f = lf[lo, L_FREE]
            if f >= g and f < best_free and leaf_eligible(tier, lf, lo, now, end, mn, budget):
                best = lo
                best_free = f
                best_floor = lf[lo, L_FLOOR]
            continue
        half = w >> 1
        stack[sp, 0] = 2 * node + 1
        stack[sp, 1] = lo + half
        stack[sp, 2] = half
        stack[sp + 1, 0] = 2 * node
        stack[sp + 1, 1] = lo
        stack[sp + 1, 2] = half
        sp += 2
    return best


@njit(cache=True)
def find_static(tier, now, end, mn, budget, g, lf, size, stat, stack):
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
        if not node_may_fit(tier, stat, node, now, end, mn, budget):
            continue
        if w == 1:
            if lf[lo, L_GPUS] >= g and leaf_eligible(tier, lf, lo, now, end, mn, budget):
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


@njit(cache=True)
def find_multi(tier, now, end, mn, budget, g, limit, lf, fab_start, fab_end, fab_leaf, fab_wf):
    """Fabric whose cheapest whole free eligible hosts hold g GPUs with the lowest highest floor,
    then fewest hosts, then lowest fabric_id; -1 if none."""
    best_f = -1
    best_hf = 0
    best_cnt = 0
    for f in range(len(fab_start)):
        if fab_wf[f] < g:
            continue
        total = 0
        cnt = 0
        for j in range(fab_start[f], fab_end[f]):
            i = fab_leaf[j]
            fl = lf[i, L_FLOOR]
            if fl > limit or (best_f >= 0 and fl > best_hf):
                break
            if lf[i, L_FREE] != lf[i, L_GPUS]:
                continue
            if not leaf_eligible(tier, lf, i, now, end, mn, budget):
                continue
            total += lf[i, L_GPUS]
            cnt += 1
            if total >= g:
                if best_f < 0 or fl < best_hf or (fl == best_hf and cnt < best_cnt):
                    best_f = f
                    best_hf = fl
                    best_cnt = cnt
                break
    return best_f


@njit(cache=True)
def need_multi_static(tier, now, end, mn, budget, g, lf, fab_start, fab_end, fab_leaf, fab_total):
    """Lowest floor at which one fabric's whole hosts (eligible, ignoring free) hold g GPUs."""
    best = -1
    for f in range(len(fab_start)):
        if fab_total[f] < g:
            continue
        total = 0
        for j in range(fab_start[f], fab_end[f]):
            i = fab_leaf[j]
            fl = lf[i, L_FLOOR]
            if best >= 0 and fl >= best:
                break
            if not leaf_eligible(tier, lf, i, now, end, mn, budget):
                continue
            total += lf[i, L_GPUS]
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
def class_reason(
    tier, now, tick, c, cls_key, cls_st, max_host,
    lf, size, stat, nv, nbest, fab_start, fab_end, fab_leaf, fab_total, stack,
):
    """Fill cls_st[c] (CODE, NEED) for this tick: reasons 1-6 of the rule, or 0 and the floor
    the class would need."""
    if cls_st[c, C_STAMP] == tick:
        return
    end = now + cls_key[c, K_DUR]
    mn = cls_key[c, K_MN]
    budget = cls_key[c, K_BUDGET]
    g = cls_key[c, K_GPUS]
    code = 0
    need = -1
    if stat[1, T_AVAIL] < end:
        code = R_NO_SUPPLY_WINDOW
    elif tier == FIRM and stat[1, T_EFIRM] < end:
        code = R_NO_FIRM_WINDOW
    elif tier == SPOT and stat[1, T_ESPOT] < end:
        code = R_RESERVATION
    elif tier == SPOT and _notice_window(nv, nbest, mn) < end:
        code = R_NOTICE_TOO_LONG
    else:
        if g > max_host:
            need = need_multi_static(
                tier, now, end, mn, budget, g, lf, fab_start, fab_end, fab_leaf, fab_total
            )
        else:
            leaf = find_static(tier, now, end, mn, budget, g, lf, size, stat, stack)
            if leaf >= 0:
                need = lf[leaf, L_FLOOR]
        if need < 0:
            if tier == SPOT and find_static(tier, now, end, mn, budget, 0, lf, size, stat, stack) < 0:
                code = R_SURVIVAL_TOO_HIGH
            else:
                code = R_TOO_LARGE
    cls_st[c, C_STAMP] = tick
    cls_st[c, C_CODE] = code
    cls_st[c, C_NEED] = need


# ---------------------------------------------------------------------------------------------
# one tier's allocation


@njit(cache=True)
def _take(lf, i, give, size, dyn, bit, fab_wf):
    was_whole_free = lf[i, L_FREE] == lf[i, L_GPUS] and lf[i, L_GPUS] == lf[i, L_HOSTG]
    lf[i, L_FREE] -= give
    if was_whole_free:
        fab_wf[lf[i, L_FAB]] -= lf[i, L_GPUS]
    _update_dyn(dyn, size, lf, i, bit)


@njit(cache=True)
def clear_tier(
    tier, now, tick, max_host,
    m_bid, m_limit, m_seq, m_cls, m_state,
    p_bid, p_limit, p_seq, p_cls, p_state,
    cls_key, cls_st,
    lf, n, size, dyn, stat, bit, ge, le,
    fab_start, fab_end, fab_leaf, fab_wf, fab_total, nv, nbest,
    fill_bid, fill_block, fill_gpus,
):
    """Walk the tier's live bids in price-time priority (merging the main run and the pending
    run on the fly) and allocate.  Winners get state WON.  Returns
    (fills, winners, max_floor, lowest winning limit, highest losing structurally eligible limit
    or -1)."""
    stack = np.empty((256, 3), dtype=np.int64)
    max_floor = 0
    lowest_win = I64_MAX
    highest_lose = -1
    n_win = 0
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
        won = False
        if lim >= max_floor and cls_st[c, C_DEAD] != tick:
            end = now + cls_key[c, K_DUR]
            mn = cls_key[c, K_MN]
            budget = cls_key[c, K_BUDGET]
            g = cls_key[c, K_GPUS]
            if g <= max_host:
                leaf = find_single(tier, now, end, mn, budget, g, lim, lf, n, size, dyn, ge, le, stack)
                if leaf >= 0:
                    _take(lf, leaf, g, size, dyn, bit, fab_wf)
                    fill_bid[nf] = bid_id
                    fill_block[nf] = lf[leaf, L_BLOCK]
                    fill_gpus[nf] = g
                    nf += 1
                    max_floor = max(max_floor, lf[leaf, L_FLOOR])
                    won = True
            else:
                f = find_multi(tier, now, end, mn, budget, g, lim, lf, fab_start, fab_end, fab_leaf, fab_wf)
                if f >= 0:
                    remaining = g
                    for jj in range(fab_start[f], fab_end[f]):
                        leaf = fab_leaf[jj]
                        if lf[leaf, L_FREE] != lf[leaf, L_GPUS]:
                            continue
                        if not leaf_eligible(tier, lf, leaf, now, end, mn, budget):
                            continue
                        give = min(remaining, lf[leaf, L_GPUS])
                        _take(lf, leaf, give, size, dyn, bit, fab_wf)
                        fill_bid[nf] = bid_id
                        fill_block[nf] = lf[leaf, L_BLOCK]
                        fill_gpus[nf] = give
                        nf += 1
                        max_floor = max(max_floor, lf[leaf, L_FLOOR])
                        remaining -= give
                        if remaining == 0:
                            break
                    won = True
            if not won:
                # Free GPUs only shrink and later bids of the class have no higher limit.
                cls_st[c, C_DEAD] = tick
        if won:
            if from_main:
                m_state[k] = STATE_WON
            else:
                p_state[k] = STATE_WON
            n_win += 1
            lowest_win = min(lowest_win, lim)
        elif highest_lose < 0:
            # Bids come in descending limit: the first structurally eligible loser sets it.
            class_reason(
                tier, now, tick, c, cls_key, cls_st, max_host,
                lf, size, stat, nv, nbest, fab_start, fab_end, fab_leaf, fab_total, stack,
            )
            if cls_st[c, C_CODE] == 0:
                highest_lose = lim
    return nf, n_win, max_floor, lowest_win, highest_lose


@njit(cache=True)
def emit_losers(
    tier, now, tick, price, max_host,
    m_ids, m_pos, m_lim, m_cls, m_state,
    p_ids, p_pos, p_lim, p_cls, p_state,
    cls_key, cls_st,
    lf, size, stat, nv, nbest, fab_start, fab_end, fab_leaf, fab_total,
    out_bid, out_code, out_short,
):
    """Reasons of the losing bids in bid_id order; retires this tick's winners (WON -> DEAD).
    `price` is the clearing price, or the indicative price when nothing traded."""
    stack = np.empty((256, 3), dtype=np.int64)
    nout = 0
    i = 0
    j = 0
    nm = len(m_ids)
    npend = len(p_ids)
    while i < nm or j < npend:
        if j >= npend or (i < nm and m_ids[i] < p_ids[j]):
            pos = m_pos[i]
            st = m_state[pos]
            if st == STATE_WON:
                m_state[pos] = STATE_DEAD
            bid_id = m_ids[i]
            lim = m_lim[i]
            c = m_cls[i]
            i += 1
        else:
            pos = p_pos[j]
            st = p_state[pos]
            if st == STATE_WON:
                p_state[pos] = STATE_DEAD
            bid_id = p_ids[j]
            lim = p_lim[j]
            c = p_cls[j]
            j += 1
        if st != STATE_LIVE:
            continue
        class_reason(
            tier, now, tick, c, cls_key, cls_st, max_host,
            lf, size, stat, nv, nbest, fab_start, fab_end, fab_leaf, fab_total, stack,
        )
        code = cls_st[c, C_CODE]
        short = 0
        if code == 0:
            if lim < price:
                code = R_LIMIT_BELOW_PRICE
                short = price - lim
            elif lim < cls_st[c, C_NEED]:
                code = R_BELOW_FLOOR
            else:
                code = R_NO_CAPACITY
        out_bid[nout] = bid_id
        out_code[nout] = code
        out_short[nout] = short
        nout += 1
    return nout


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
        id_lim[o] = lim[p]
        id_cls[o] = cls[p]
        o += 1
    return bid, lim, seq, cls, state, ids, pos, id_lim, id_cls


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
