"""Plain-Python reference of the clearing rule in docs/matching.md.

Slow and literal on purpose: every step reads like the document, with no index and no cache, so
that the numba engine (`matching.book`) can be checked against it on random books.  Inputs are
lists of dicts (keys as in `matching.arrays.BLOCK_FIELDS` / `BID_FIELDS`, incumbents with
`lease_id` and `limit`); outputs are plain ints and lists, comparable with
`TickResult.as_dict()`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from matching.arrays import Tier
from matching.reasons import Reason

FNV_OFFSET = 0xCBF29CE484222325
FNV_PRIME = 0x100000001B3
MASK64 = (1 << 64) - 1


def fnv1a_words(words: Iterable[int]) -> int:
    """64-bit FNV-1a over 64-bit words (each value taken as one two's-complement word)."""
    h = FNV_OFFSET
    for w in words:
        h ^= w & MASK64
        h = (h * FNV_PRIME) & MASK64
    return h


def state_hash(fills, price, indicative, losers, outbid) -> int:
    def words():
        for f in fills:
            yield from f
        yield price
        yield indicative
        for r in losers:
            yield from r
        yield from outbid

    return fnv1a_words(words())


@dataclass
class ReferenceResult:
    firm: dict
    spot: dict
    free_after: dict[int, int] = field(default_factory=dict)


def _end(bid: Mapping, now: int) -> int:
    return now + bid["duration_s"]


def _survives(bid: Mapping, blk: Mapping, now: int) -> bool:
    end = _end(bid, now)
    exposure = max(0, end - max(now, blk["firm_until"]))
    return blk["rate_mph"] * exposure <= bid["hazard_budget"]


def _eligible(tier: Tier, bid: Mapping, blk: Mapping, now: int) -> bool:
    """The eligibility test of the rule, floor included, free excluded."""
    end = _end(bid, now)
    if end > blk["available_until"] or blk["floor"] > bid["limit"]:
        return False
    if tier == Tier.FIRM:
        return blk["firm_until"] >= end
    return (
        end <= blk["cut_at"]
        and blk["notice_s"] >= bid["min_notice_s"]
        and _survives(bid, blk, now)
    )


def _whole_free(blk: Mapping) -> bool:
    return blk["free"] == blk["gpus"] == blk["host_gpus"]


def _cheapest_hosts(candidates: list[dict], gpus: int) -> list[dict] | None:
    """Take hosts in (floor, block_id) order until they add up to `gpus`; None if they cannot."""
    taken, total = [], 0
    for blk in sorted(candidates, key=lambda k: (k["floor"], k["block_id"])):
        taken.append(blk)
        total += blk["gpus"]
        if total >= gpus:
            return taken
    return None


def _place(tier: Tier, bid: Mapping, blocks: list[dict], now: int, max_host: int):
    """The blocks and GPU counts the bid gets, or None."""
    gpus = bid["gpus"]
    if gpus <= max_host:
        fits = [k for k in blocks if _eligible(tier, bid, k, now) and k["free"] >= gpus]
        if not fits:
            return None
        best = min(fits, key=lambda k: (k["floor"], k["free"], k["block_id"]))
        return [(best, gpus)]
    best_key, best_hosts = None, None
    for fabric in sorted({k["fabric_id"] for k in blocks}):
        cands = [
            k
            for k in blocks
            if k["fabric_id"] == fabric and _whole_free(k) and _eligible(tier, bid, k, now)
        ]
        hosts = _cheapest_hosts(cands, gpus)
        if hosts is None:
            continue
        key = (hosts[-1]["floor"], len(hosts), fabric)
        if best_key is None or key < best_key:
            best_key, best_hosts = key, hosts
    if best_hosts is None:
        return None
    placed, need = [], gpus
    for blk in best_hosts:
        give = min(blk["gpus"], need)
        placed.append((blk, give))
        need -= give
    return placed


def _structural(tier: Tier, bid: Mapping, blocks: list[dict], now: int, max_host: int):
    """(reason code 1-6 or 0, the floor the bid would need when 0) — ignores free and floor."""
    end = _end(bid, now)
    s = [k for k in blocks if end <= k["available_until"]]
    if not s:
        return Reason.NO_SUPPLY_WINDOW, None
    if tier == Tier.FIRM:
        s = [k for k in s if k["firm_until"] >= end]
        if not s:
            return Reason.NO_FIRM_WINDOW, None
    else:
        s = [k for k in s if end <= k["cut_at"]]
        if not s:
            return Reason.RESERVATION, None
        s = [k for k in s if k["notice_s"] >= bid["min_notice_s"]]
        if not s:
            return Reason.NOTICE_TOO_LONG, None
        s = [k for k in s if _survives(bid, k, now)]
        if not s:
            return Reason.SURVIVAL_TOO_HIGH, None
    gpus = bid["gpus"]
    if gpus <= max_host:
        big = [k for k in s if k["gpus"] >= gpus]
        if not big:
            return Reason.TOO_LARGE, None
        return 0, min(k["floor"] for k in big)
    needs = []
    for fabric in {k["fabric_id"] for k in s}:
        whole = [k for k in s if k["fabric_id"] == fabric and k["gpus"] == k["host_gpus"]]
        hosts = _cheapest_hosts(whole, gpus)
        if hosts is not None:
            needs.append(hosts[-1]["floor"])
    if not needs:
        return Reason.TOO_LARGE, None
    return 0, min(needs)


def _allocate(blocks, tagged_bids, now, max_host):
    """Both tiers' bids in one price-time priority walk (limit desc, seq asc, firm before spot
    on a tie); each tier has its own max_floor.  Returns per tier (fills, winners, losers)."""
    order = sorted(tagged_bids, key=lambda tb: (-tb[1]["limit"], tb[1]["seq"], tb[0]))
    max_floor = {Tier.FIRM: 0, Tier.SPOT: 0}
    out = {t: ([], [], []) for t in Tier}
    for tier, bid in order:
        fills, winners, losers = out[tier]
        placed = None
        if bid["limit"] >= max_floor[tier]:
            placed = _place(tier, bid, blocks, now, max_host)
        if placed is None:
            losers.append(bid)
            continue
        for blk, give in placed:
            blk["free"] -= give
            fills.append((bid["bid_id"], blk["block_id"], give))
            max_floor[tier] = max(max_floor[tier], blk["floor"])
        winners.append(bid)
    return out, max_floor


def _price_tier(tier, blocks, fills, winners, losers, max_floor, incumbents, now, max_host) -> dict:
    """Price, indicative price, competing limit, reasons and outbid incumbents of one tier,
    after the walk."""
    structural = {b["bid_id"]: _structural(tier, b, blocks, now, max_host) for b in losers}
    eligible_limits = [b["limit"] for b in losers if structural[b["bid_id"]][0] == 0]
    highest_losing = max(eligible_limits, default=-1)
    if winners:
        price = min(max(highest_losing, max_floor), min(b["limit"] for b in winners))
        indicative = price
        reference_price = price
    else:
        price = -1
        free_floors = [k["floor"] for k in blocks if k["free"] > 0]
        indicative = max(highest_losing, min(free_floors, default=-1), 0)
        reference_price = indicative

    reasons = []
    for bid in sorted(losers, key=lambda b: b["bid_id"]):
        code, need = structural[bid["bid_id"]]
        shortfall = 0
        if code == 0:
            if bid["limit"] < reference_price:
                code, shortfall = Reason.LIMIT_BELOW_PRICE, reference_price - bid["limit"]
            elif bid["limit"] < need:
                code = Reason.BELOW_FLOOR
            else:
                code = Reason.NO_CAPACITY
        reasons.append((bid["bid_id"], int(code), shortfall))

    # Only a competing bid that lost and pays more ends a running lease (SPEC §4): never a floor,
    # accepted or not, so neither the indicative price nor a price raised to a floor counts.
    outbid = sorted(i["lease_id"] for i in incumbents if i["limit"] < highest_losing)
    return {
        "fills": fills,
        "price": price,
        "indicative": indicative,
        "competing_limit": highest_losing,
        "losers": reasons,
        "outbid": outbid,
        "state_hash": state_hash(fills, price, indicative, reasons, outbid),
    }


def reference_tick(
    blocks: Iterable[Mapping],
    firm_bids: Iterable[Mapping],
    spot_bids: Iterable[Mapping],
    incumbents: Iterable[Mapping],
    now: int,
) -> ReferenceResult:
    """Clear both tiers in one price-time priority walk, exactly as docs/matching.md says."""
    blks = sorted((dict(b) for b in blocks), key=lambda k: k["block_id"])
    max_host = max((k["host_gpus"] for k in blks), default=0)
    tagged = [(Tier.FIRM, dict(b)) for b in firm_bids] + [(Tier.SPOT, dict(b)) for b in spot_bids]
    walked, max_floor = _allocate(blks, tagged, now, max_host)
    firm, spot = (
        _price_tier(tier, blks, *walked[tier], max_floor[tier], incs, now, max_host)
        for tier, incs in ((Tier.FIRM, []), (Tier.SPOT, [dict(i) for i in incumbents]))
    )
    return ReferenceResult(firm=firm, spot=spot, free_after={k["block_id"]: k["free"] for k in blks})
