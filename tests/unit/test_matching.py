"""The numba engine (matching.book) against the plain-Python reference (matching.reference),
the invariants of SPEC §4, and hand-written examples that pin docs/matching.md."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from matching import (
    INT64_MAX,
    ModelBook,
    Reason,
    Tier,
    hazard_budget_from_survival,
    rate_mph_from_per_hour,
    reference_tick,
    warm_up,
)
from matching.arrays import BID_FIELDS
from matching.testing import add_records, book_from_records, columns, upsert_records

NOW = 1_000_000
H = 3600
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    warm_up()


# ---------------------------------------------------------------------------------------------
# random books


@st.composite
def blocks_st(draw, max_blocks=10, rates=(0, 10, 100, 1000)):
    n = draw(st.integers(0, max_blocks))
    blocks = []
    for k in range(n):
        host_gpus = draw(st.sampled_from([4, 8]))
        gpus = draw(st.one_of(st.just(host_gpus), st.integers(1, host_gpus)))
        free = draw(st.one_of(st.just(gpus), st.integers(0, gpus)))
        blocks.append(
            {
                "block_id": 10 + 3 * k,
                "host_id": 100 + k,
                "fabric_id": draw(st.integers(1, 3)),
                "host_gpus": host_gpus,
                "gpus": gpus,
                "free": free,
                "floor": draw(st.sampled_from([0, 100, 200, 300, 500])),
                "available_until": NOW + draw(st.sampled_from([0, 1, 2, 6, 24, 48])) * H,
                "firm_until": draw(st.sampled_from([0, NOW - H, NOW + 3 * H, NOW + 30 * H])),
                "notice_s": draw(st.sampled_from([0, 60, 120, 300])),
                "rate_mph": draw(st.sampled_from(rates)),
                "cut_at": draw(st.sampled_from([INT64_MAX, NOW + 5 * H, NOW + H])),
            }
        )
    return blocks


BUDGETS = [INT64_MAX, hazard_budget_from_survival(0.9), hazard_budget_from_survival(0.5), 0]


@st.composite
def market_st(draw, max_blocks=10, max_bids=14, rates=(0, 10, 100, 1000)):
    blocks = draw(blocks_st(max_blocks=max_blocks, rates=rates))
    n_firm = draw(st.integers(0, max_bids))
    n_spot = draw(st.integers(0, max_bids))
    seqs = draw(st.permutations(range(1, n_firm + n_spot + 1)))
    ids = draw(st.lists(st.integers(1, 10_000), min_size=n_firm + n_spot,
                        max_size=n_firm + n_spot, unique=True))
    bids = []
    for i in range(n_firm + n_spot):
        bids.append(
            {
                "bid_id": ids[i],
                "seq": seqs[i],
                "gpus": draw(st.sampled_from([1, 2, 3, 4, 6, 8, 12, 16, 24])),
                "duration_s": draw(st.sampled_from([1, 2, 6, 24])) * H,
                "limit": draw(st.sampled_from([50, 100, 200, 300, 400, 600])),
                "hazard_budget": draw(st.sampled_from(BUDGETS)),
                "min_notice_s": draw(st.sampled_from([0, 60, 120, 300])),
            }
        )
    leases = draw(st.lists(st.integers(1, 50), max_size=4, unique=True))
    incumbents = [{"lease_id": i, "limit": draw(st.sampled_from([100, 300, 500]))} for i in leases]
    return blocks, bids[:n_firm], bids[n_firm:], incumbents


def engine_tick(blocks, firm, spot, incumbents, now=NOW):
    book = book_from_records(blocks, firm, spot, incumbents)
    return book, book.tick(now)


def free_after(book: ModelBook) -> dict[int, int]:
    cols = book.blocks()
    return dict(zip(cols["block_id"].tolist(), cols["free"].tolist(), strict=True))


# ---------------------------------------------------------------------------------------------
# engine == reference


def assert_engine_matches_reference(market) -> None:
    """The engine's tick equals the reference's: both tiers' results and the free GPUs left."""
    blocks, firm, spot, incumbents = market

    book, result = engine_tick(blocks, firm, spot, incumbents)
    expected = reference_tick(blocks, firm, spot, incumbents, NOW)

    assert result.firm.as_dict() == expected.firm
    assert result.spot.as_dict() == expected.spot
    assert free_after(book) == expected.free_after


@PROPERTY
@given(market_st())
def test_engine_equals_reference_on_random_books(market):
    assert_engine_matches_reference(market)


@PROPERTY
@given(market_st(max_blocks=24, max_bids=30))
def test_engine_equals_reference_on_larger_books_with_big_gangs(market):
    assert_engine_matches_reference(market)


@settings(max_examples=40, deadline=None)
@given(market_st(max_blocks=24, max_bids=20, rates=tuple(range(0, 2000, 15))))
def test_engine_equals_reference_with_more_than_64_reclaim_profiles(market):
    # 134 rates x 4 notices: the engine groups reclaim profiles into 64 buckets.
    blocks, firm, spot, incumbents = market

    _, result = engine_tick(blocks, firm, spot, incumbents)
    expected = reference_tick(blocks, firm, spot, incumbents, NOW)

    assert result.spot.as_dict() == expected.spot


# ---------------------------------------------------------------------------------------------
# invariants


def _eligible(tier, bid, blk, now=NOW):
    end = now + bid["duration_s"]
    if end > blk["available_until"] or blk["floor"] > bid["limit"]:
        return False
    if tier == Tier.FIRM:
        return blk["firm_until"] >= end
    exposure = max(0, end - max(now, blk["firm_until"]))
    return (end <= blk["cut_at"] and blk["notice_s"] >= bid["min_notice_s"]
            and blk["rate_mph"] * exposure <= bid["hazard_budget"])


@PROPERTY
@given(market_st(max_blocks=16, max_bids=20))
def test_invariants_hold(market):
    blocks, firm, spot, incumbents = market
    by_id = {b["block_id"]: dict(b) for b in blocks}
    max_host = max((b["host_gpus"] for b in blocks), default=0)

    _, result = engine_tick(blocks, firm, spot, incumbents)

    tiers = ((Tier.FIRM, firm, result.firm), (Tier.SPOT, spot, result.spot))
    for tier, bids, res in tiers:
        bid_of = {b["bid_id"]: b for b in bids}
        winners = set(res.fill_bid_id.tolist())
        for bid_id, block_id, gpus in zip(res.fill_bid_id.tolist(), res.fill_block_id.tolist(),
                                          res.fill_gpus.tolist(), strict=True):
            blk, bid = by_id[block_id], bid_of[bid_id]
            assert bid["limit"] >= res.price, "a winner pays above its limit"
            assert blk["floor"] <= res.price, "an owner receives below its floor"
            assert _eligible(tier, bid, blk), "placed on a block it is not eligible for"
            if tier == Tier.FIRM:
                assert blk["firm_until"] >= NOW + bid["duration_s"], "firm lease can be reclaimed"
            blk["free"] -= gpus
            assert blk["free"] >= 0, "GPUs sold beyond the free count"
        for bid_id in winners:
            assert sum(g for b, g in zip(res.fill_bid_id.tolist(), res.fill_gpus.tolist(),
                                         strict=True) if b == bid_id) == bid_of[bid_id]["gpus"]
    # What is left after both tiers' fills.
    for tier, bids, res in tiers:
        winners = set(res.fill_bid_id.tolist())
        bid_of = {b["bid_id"]: b for b in bids}
        price = res.price if winners else res.indicative
        for bid in bids:
            if bid["bid_id"] in winners or bid["limit"] <= price:
                continue
            # An unfilled bid above the price has no block left that it fits.
            if bid["gpus"] <= max_host:
                assert not any(_eligible(tier, bid, k) and k["free"] >= bid["gpus"]
                               for k in by_id.values())
            else:
                for fabric in {k["fabric_id"] for k in by_id.values()}:
                    whole = [k for k in by_id.values() if k["fabric_id"] == fabric
                             and k["free"] == k["gpus"] == k["host_gpus"] and _eligible(tier, bid, k)]
                    assert sum(k["gpus"] for k in whole) < bid["gpus"]
        assert set(res.loser_bid_id.tolist()) | winners == set(bid_of)
        assert np.all(np.diff(res.loser_bid_id) > 0)
        assert np.all((res.loser_shortfall > 0) == (res.loser_reason == Reason.LIMIT_BELOW_PRICE))
    assert len(result.firm.outbid_lease_id) == 0
    # SPEC §4: an incumbent is outbid only by a losing spot bid that pays more.
    losing_limits = [b["limit"] for b in spot if b["bid_id"] in set(result.spot.loser_bid_id.tolist())]
    assert result.spot.competing_limit in [-1, *losing_limits]
    limit_of = {i["lease_id"]: i["limit"] for i in incumbents}
    for lease_id in result.spot.outbid_lease_id.tolist():
        assert any(lim > limit_of[lease_id] for lim in losing_limits)


@PROPERTY
@given(market_st())
def test_without_competing_spot_bids_no_incumbent_is_outbid(market):
    # SPEC §4: asks (floors) and firm bids never end a running spot lease, whatever the floors.
    blocks, firm, _, incumbents = market

    _, result = engine_tick(blocks, firm, [], incumbents)

    assert result.spot.competing_limit == -1
    assert result.spot.outbid_lease_id.tolist() == []


@PROPERTY
@given(market_st())
def test_same_input_gives_same_hash(market):
    blocks, firm, spot, incumbents = market

    _, first = engine_tick(blocks, firm, spot, incumbents)
    _, again = engine_tick(list(reversed(blocks)), list(reversed(firm)), spot, incumbents)

    assert first.firm.state_hash == again.firm.state_hash
    assert first.spot.state_hash == again.spot.state_hash


# ---------------------------------------------------------------------------------------------
# the stateful book


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(market_st(max_blocks=12, max_bids=24), st.data())
def test_incremental_book_equals_fresh_book(market, data):
    blocks, firm, spot, incumbents = market
    book = book_from_records(blocks, firm, spot, incumbents)
    book.tick(NOW)
    live = {Tier.FIRM: {b["bid_id"]: b for b in firm}, Tier.SPOT: {b["bid_id"]: b for b in spot}}
    # Winners left the book; what stays are the losers.
    for tier, res in ((Tier.FIRM, book_tick_losers(book, Tier.FIRM)),
                      (Tier.SPOT, book_tick_losers(book, Tier.SPOT))):
        live[tier] = {i: live[tier][i] for i in res}
    next_seq = 1000
    for _ in range(data.draw(st.integers(1, 3))):
        tier = data.draw(st.sampled_from([Tier.FIRM, Tier.SPOT]))
        if live[tier] and data.draw(st.booleans()):
            gone = data.draw(st.lists(st.sampled_from(sorted(live[tier])), max_size=4, unique=True))
            book.remove_bids(tier, np.array(gone, np.int64))
            for i in gone:
                del live[tier][i]
        fresh = [{
            "bid_id": 20_000 + next_seq + j,
            "seq": next_seq + j,
            "gpus": data.draw(st.sampled_from([1, 2, 4, 8, 16])),
            "duration_s": H * data.draw(st.sampled_from([1, 6])),
            "limit": data.draw(st.sampled_from([100, 300, 500])),
            "hazard_budget": INT64_MAX,
            "min_notice_s": 0,
        } for j in range(data.draw(st.integers(0, 5)))]
        next_seq += 10
        add_records(book, tier, fresh)
        live[tier].update({b["bid_id"]: b for b in fresh})
    remaining_blocks = [dict(b, free=free_after(book)[b["block_id"]]) for b in blocks]

    result = book.tick(NOW + 2)
    fresh_book = book_from_records(remaining_blocks, list(live[Tier.FIRM].values()),
                                   list(live[Tier.SPOT].values()), incumbents)
    expected = fresh_book.tick(NOW + 2)
    reference = reference_tick(remaining_blocks, list(live[Tier.FIRM].values()),
                               list(live[Tier.SPOT].values()), incumbents, NOW + 2)

    assert result.firm.as_dict() == expected.firm.as_dict() == reference.firm
    assert result.spot.as_dict() == expected.spot.as_dict() == reference.spot


def book_tick_losers(book: ModelBook, tier: Tier) -> list[int]:
    t = book._bids
    ids = np.concatenate([t.main.ids, t.pend.ids])
    state = np.concatenate([t.main.state[t.main.pos], t.pend.state[t.pend.pos]])
    live = ids[(state == 1) & (ids % 2 == int(tier))]
    return (live >> 1).tolist()


def test_compaction_keeps_the_book():
    blocks = [block(1, floor=100, gpus=8)]
    bids = [bid(i, limit=100 + i, gpus=8) for i in range(1, 40)]
    book = book_from_records(blocks, [], bids)
    book.remove_bids(Tier.SPOT, np.arange(1, 30))
    book.compact()

    result = book.tick(NOW)

    assert result.spot.fill_bid_id.tolist() == [39]
    assert result.spot.loser_bid_id.tolist() == list(range(30, 39))
    assert book.bid_count(Tier.SPOT) == 9


def test_block_changes_apply_to_the_next_tick():
    book = book_from_records([block(1, floor=100), block(2, floor=200)], [], [])
    upsert_records(book, [block(1, floor=300)])
    book.remove_blocks(np.array([2]))
    add_records(book, Tier.SPOT, [bid(1, limit=250, gpus=1)])

    result = book.tick(NOW)

    assert result.spot.fill_bid_id.tolist() == []
    assert result.spot.indicative == 300  # the lowest free floor
    assert result.spot.loser_reason.tolist() == [Reason.LIMIT_BELOW_PRICE]
    assert result.spot.loser_shortfall.tolist() == [50]


# ---------------------------------------------------------------------------------------------
# hand-written examples


def block(block_id, *, floor=100, gpus=8, host_gpus=8, free=None, fabric=1, firm_until=0,
          available_until=NOW + 48 * H, notice=120, rate=0, cut=INT64_MAX):
    return {"block_id": block_id, "host_id": block_id, "fabric_id": fabric, "host_gpus": host_gpus,
            "gpus": gpus, "free": gpus if free is None else free, "floor": floor,
            "available_until": available_until, "firm_until": firm_until, "notice_s": notice,
            "rate_mph": rate, "cut_at": cut}


def bid(bid_id, *, limit, gpus=1, seq=None, duration=H, budget=INT64_MAX, min_notice=0):
    return {"bid_id": bid_id, "seq": bid_id if seq is None else seq, "gpus": gpus,
            "duration_s": duration, "limit": limit, "hazard_budget": budget,
            "min_notice_s": min_notice}


def check_spot(blocks, bids, incumbents=()):
    """Engine result for a spot-only book, after checking it equals the reference."""
    _, result = engine_tick(blocks, [], bids, list(incumbents))
    assert result.spot.as_dict() == reference_tick(blocks, [], bids, list(incumbents), NOW).spot
    return result.spot


def test_price_is_the_highest_losing_limit():
    blocks = [block(1, floor=100, gpus=2, host_gpus=8)]
    bids = [bid(1, limit=500), bid(2, limit=400), bid(3, limit=300), bid(4, limit=200)]

    res = check_spot(blocks, bids)

    assert res.fill_bid_id.tolist() == [1, 2]
    assert res.price == 300
    assert res.loser_reason.tolist() == [Reason.NO_CAPACITY, Reason.LIMIT_BELOW_PRICE]
    assert res.loser_shortfall.tolist() == [0, 100]


def test_price_is_capped_at_the_lowest_winning_limit():
    # Bid 1 (limit 500, 8 GPUs) finds no room after bid 0 takes the host: it loses with the
    # highest losing limit, but the winner only bid 300.
    blocks = [block(1, floor=100, gpus=8)]
    bids = [bid(0, limit=600, gpus=4, seq=0), bid(1, limit=500, gpus=8), bid(2, limit=300, gpus=4)]

    res = check_spot(blocks, bids)

    assert res.fill_bid_id.tolist() == [0, 2]
    assert res.price == 300


def test_price_is_raised_to_the_highest_accepted_floor():
    blocks = [block(1, floor=250, gpus=1, host_gpus=8)]
    bids = [bid(1, limit=400), bid(2, limit=100)]

    res = check_spot(blocks, bids)

    assert res.fill_bid_id.tolist() == [1]
    assert res.price == 250
    assert res.loser_reason.tolist() == [Reason.LIMIT_BELOW_PRICE]
    assert res.loser_shortfall.tolist() == [150]


def test_tightest_fit_on_equal_floors_then_lowest_block_id():
    blocks = [block(1, free=8), block(2, free=3), block(3, free=2), block(4, free=2),
              block(5, floor=50, free=1)]

    res = check_spot(blocks, [bid(1, limit=500, gpus=2)])

    assert res.fill_block_id.tolist() == [3]


def test_cheapest_block_wins_over_tighter_fit():
    blocks = [block(1, floor=100, free=2), block(2, floor=90, free=8)]

    res = check_spot(blocks, [bid(1, limit=500, gpus=2)])

    assert res.fill_block_id.tolist() == [2]


def test_multi_host_gang_takes_whole_hosts_in_one_fabric():
    blocks = [block(1, fabric=1, floor=100), block(2, fabric=1, floor=400),
              block(3, fabric=2, floor=200), block(4, fabric=2, floor=150),
              block(5, fabric=2, floor=120, free=7)]

    res = check_spot(blocks, [bid(1, limit=500, gpus=12)])

    # Fabric 1 would charge up to 400, fabric 2 up to 200 (block 5 is not entirely free).
    assert res.fill_block_id.tolist() == [4, 3]
    assert res.fill_gpus.tolist() == [8, 4]
    assert res.price == 200


def test_firm_bid_needs_a_covering_firm_window():
    blocks = [block(1, firm_until=NOW + 2 * H), block(2, firm_until=NOW + 10 * H, floor=300)]
    firm = [bid(1, limit=400, gpus=8, duration=5 * H)]
    spot = [bid(2, limit=900, gpus=8, duration=H)]

    _, result = engine_tick(blocks, firm, spot, [])

    assert result.firm.fill_block_id.tolist() == [2]
    assert result.spot.fill_block_id.tolist() == [1]
    assert result.firm.as_dict() == reference_tick(blocks, firm, spot, [], NOW).firm


def test_both_tiers_share_one_price_priority():
    # One block, eligible for both tiers: the higher limit per GPU-hour gets it, whatever its
    # tier; on equal limits the earlier seq, and on equal seq too, firm.
    blocks = [block(1, firm_until=NOW + 10 * H, gpus=8)]
    firm = [bid(1, limit=400, gpus=8), bid(3, limit=900, gpus=8, seq=5)]
    spot = [bid(2, limit=500, gpus=8), bid(4, limit=900, gpus=8, seq=4)]

    _, result = engine_tick(blocks, firm, spot, [])

    assert result.spot.fill_bid_id.tolist() == [4]
    assert result.firm.fill_bid_id.tolist() == []
    reference = reference_tick(blocks, firm, spot, [], NOW)
    assert (result.firm.as_dict(), result.spot.as_dict()) == (reference.firm, reference.spot)

    firm[1]["seq"] = 4  # the same seq in both tiers: firm first
    _, result = engine_tick(blocks, firm, spot, [])

    assert result.firm.fill_bid_id.tolist() == [3]
    assert result.spot.fill_bid_id.tolist() == []


@pytest.mark.parametrize(
    ("blk", "the_bid", "reason"),
    [
        (block(1, available_until=NOW + H), bid(1, limit=500, duration=2 * H),
         Reason.NO_SUPPLY_WINDOW),
        (block(1, cut=NOW + H), bid(1, limit=500, duration=2 * H), Reason.RESERVATION),
        (block(1, notice=60), bid(1, limit=500, min_notice=120), Reason.NOTICE_TOO_LONG),
        (block(1, rate=500), bid(1, limit=500, duration=4 * H,
                                 budget=hazard_budget_from_survival(0.9)),
         Reason.SURVIVAL_TOO_HIGH),
        (block(1, gpus=4), bid(1, limit=500, gpus=6), Reason.TOO_LARGE),
        # Block 2 is cheap but too small, so the indicative price stays at the bid's limit.
        ([block(1, floor=600), block(2, floor=100, gpus=2)], bid(1, limit=500, gpus=4),
         Reason.BELOW_FLOOR),
        (block(1, free=0), bid(1, limit=500), Reason.NO_CAPACITY),
    ],
)
def test_unfilled_reasons(blk, the_bid, reason):
    res = check_spot(blk if isinstance(blk, list) else [blk], [the_bid])

    assert res.loser_reason.tolist() == [reason]


def test_firm_window_reason():
    blocks = [block(1, firm_until=NOW + H)]
    firm = [bid(1, limit=500, duration=2 * H)]

    _, result = engine_tick(blocks, firm, [], [])

    assert result.firm.loser_reason.tolist() == [Reason.NO_FIRM_WINDOW]


def test_survival_counts_exposure_after_the_firm_window_only():
    budget = hazard_budget_from_survival(0.9)  # 379_297
    # 4 h at 100 mph = 1_440_000 > budget, but only 1 h (360_000) after the firm window.
    blocks = [block(1, rate=100, firm_until=NOW + 3 * H)]

    res = check_spot(blocks, [bid(1, limit=500, duration=4 * H, budget=budget)])

    assert res.fill_block_id.tolist() == [1]


def test_incumbents_below_the_competing_limit_are_outbid():
    blocks = [block(1, gpus=1, host_gpus=8)]
    bids = [bid(1, limit=500), bid(2, limit=300)]
    incumbents = [{"lease_id": 9, "limit": 200}, {"lease_id": 4, "limit": 250},
                  {"lease_id": 5, "limit": 300}]

    res = check_spot(blocks, bids, incumbents)

    assert res.price == res.competing_limit == 300
    assert res.outbid_lease_id.tolist() == [4, 9]


def test_only_a_losing_competing_bid_above_its_limit_outbids_an_incumbent():
    # SPEC §4: an ask that is not accepted never ends a running lease; only a competing bid that
    # needs GPUs and pays more does.  A 700 floor with no bid sets the indicative price, not the
    # incumbent's fate.
    blocks = [block(1, floor=700)]
    incumbents = [{"lease_id": 7, "limit": 200}]

    alone = check_spot(blocks, [], incumbents)
    above = check_spot(blocks, [bid(1, limit=300)], incumbents)  # loses: below the floor
    below = check_spot(blocks, [bid(1, limit=150)], incumbents)

    assert (alone.indicative, alone.competing_limit, alone.outbid_lease_id.tolist()) == (700, -1, [])
    assert above.loser_reason.tolist() == [Reason.LIMIT_BELOW_PRICE]
    assert (above.competing_limit, above.outbid_lease_id.tolist()) == (300, [7])
    assert (below.competing_limit, below.outbid_lease_id.tolist()) == (150, [])


def test_a_price_raised_to_an_accepted_floor_does_not_outbid_an_incumbent():
    # The winner pays the 400 floor; the incumbent at 300 is not outbid by a floor, and no losing
    # bid pays more than it.  A loser that is not structurally eligible (too large) competes for
    # no GPUs, so its limit does not count either.
    blocks = [block(1, floor=400, gpus=1, host_gpus=8)]
    bids = [bid(1, limit=500), bid(2, limit=900, gpus=9)]

    res = check_spot(blocks, bids, [{"lease_id": 3, "limit": 300}])

    assert res.price == 400
    assert res.loser_reason.tolist() == [Reason.TOO_LARGE]
    assert (res.competing_limit, res.outbid_lease_id.tolist()) == (-1, [])


def test_indicative_price_when_nothing_trades():
    blocks = [block(1, floor=700)]
    bids = [bid(1, limit=500), bid(2, limit=300)]

    res = check_spot(blocks, bids)

    assert res.price == -1
    assert res.indicative == 700
    assert res.loser_reason.tolist() == [Reason.LIMIT_BELOW_PRICE] * 2


def test_empty_book():
    res = check_spot([], [])

    assert res.price == -1
    assert res.indicative == 0
    assert res.fill_bid_id.tolist() == []


# ---------------------------------------------------------------------------------------------
# units


def test_hazard_budget_from_survival():
    assert hazard_budget_from_survival(0.0) == INT64_MAX
    assert hazard_budget_from_survival(1.0) == 0
    assert hazard_budget_from_survival(0.9) == 379_297
    with pytest.raises(ValueError):
        hazard_budget_from_survival(1.5)


def test_rate_mph_from_per_hour():
    assert rate_mph_from_per_hour(0.05) == 50
    assert rate_mph_from_per_hour(0.0) == 0
    with pytest.raises(ValueError):
        rate_mph_from_per_hour(-1.0)


def test_bad_input_is_rejected():
    book = ModelBook()
    with pytest.raises(ValueError):
        add_records(book, Tier.SPOT, [bid(1, limit=0)])
    with pytest.raises(ValueError):
        upsert_records(book, [block(1, gpus=8, host_gpus=4)])


# ---------------------------------------------------------------------------------------------
# re-sending blocks between ticks (the service upserts every live block each tick)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(market_st(max_blocks=14, max_bids=24), st.data())
def test_block_resend_then_tick_equals_fresh_book(market, data):
    """Upserting blocks unchanged, with only `free` changed (patched in place), or with other
    columns changed, then ticking, gives what a fresh book with those blocks gives."""
    blocks, firm, spot, incumbents = market
    book = book_from_records(blocks, firm, spot, incumbents)
    first = book.tick(NOW)
    won = {Tier.FIRM: set(first.firm.fill_bid_id.tolist()),
           Tier.SPOT: set(first.spot.fill_bid_id.tolist())}
    current = [dict(b, free=free_after(book)[b["block_id"]]) for b in blocks]
    for _ in range(data.draw(st.integers(1, 3))):
        kind = data.draw(st.sampled_from(["same", "free", "value", "floor"]))
        if not current:
            break
        picked = data.draw(st.lists(st.sampled_from(range(len(current))), max_size=5))
        for k in picked:
            b = current[k]
            if kind == "free":
                b["free"] = data.draw(st.integers(0, b["gpus"]))
            elif kind == "value":
                b["cut_at"] = data.draw(st.sampled_from([INT64_MAX, NOW + 5 * H, NOW + H]))
                b["free"] = data.draw(st.integers(0, b["gpus"]))
            elif kind == "floor":
                b["floor"] = data.draw(st.sampled_from([0, 100, 200, 300, 500]))
        # The service re-sends every block, changed or not.
        upsert_records(book, current)
    result = book.tick(NOW + 2)
    fresh = book_from_records(
        current, [b for b in firm if b["bid_id"] not in won[Tier.FIRM]],
        [b for b in spot if b["bid_id"] not in won[Tier.SPOT]], incumbents)
    expected = fresh.tick(NOW + 2)

    assert result.firm.as_dict() == expected.firm.as_dict()
    assert result.spot.as_dict() == expected.spot.as_dict()
    assert free_after(book) == free_after(fresh)


def test_resending_unchanged_blocks_keeps_the_index():
    book = book_from_records([block(1, floor=100), block(2, floor=200, free=3)], [], [])
    book.tick(NOW)
    index = book._index
    upsert_records(book, [block(1, floor=100), block(2, floor=200, free=3)])
    book.tick(NOW + 2)
    assert book._index is index  # nothing changed: no rebuild

    upsert_records(book, [block(1, floor=100, free=5), block(2, floor=200, free=3)])
    add_records(book, Tier.SPOT, [bid(1, limit=150, gpus=6), bid(2, limit=150, gpus=5)])
    result = book.tick(NOW + 4)
    assert book._index is index  # only `free` changed: patched in place
    assert result.spot.fill_bid_id.tolist() == [2]
    assert result.spot.fill_block_id.tolist() == [1]
    assert free_after(book) == {1: 0, 2: 3}


# ---------------------------------------------------------------------------------------------
# multi-host window thresholds (kernels, multi-host gangs): one per class duration, or fewer


@pytest.mark.parametrize("max_thresholds", [1, 32])
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(market=market_st(max_blocks=24, max_bids=30))
def test_multi_host_window_thresholds_equal_reference(monkeypatch, max_thresholds, market):
    # 1: every class of a tier reads the bounds of the tier's shortest duration (looser, still
    # bounds); 32: each class its own duration's.
    import matching.book as book_module

    monkeypatch.setattr(book_module, "_MAX_THRESHOLDS", max_thresholds)

    assert_engine_matches_reference(market)


def test_window_bounds_are_rebuilt_between_ticks():
    # Two ticks on one book: the second tick must not reuse the first tick's (now wrong: hosts
    # were freed again) bounds.
    blocks = [
        {"block_id": 10 + k, "host_id": 100 + k, "fabric_id": 1 + k // 4, "host_gpus": 8,
         "gpus": 8, "free": 8, "floor": 100 + 10 * k, "available_until": NOW + 48 * H,
         "firm_until": NOW + 30 * H, "notice_s": 300, "rate_mph": 0, "cut_at": INT64_MAX}
        for k in range(12)
    ]
    bids = [{"bid_id": 1 + j, "seq": 1 + j, "gpus": 16, "duration_s": H, "limit": 1000 - j,
             "hazard_budget": INT64_MAX, "min_notice_s": 0} for j in range(4)]
    book = book_from_records(blocks, bids, [], [])
    first = book.tick(NOW)
    assert first.firm.as_dict() == reference_tick(blocks, bids, [], [], NOW).firm
    # Free every host again and bid again: the same allocation as a fresh book.
    upsert_records(book, blocks)
    again = [dict(b, bid_id=b["bid_id"] + 100, seq=b["seq"] + 100) for b in bids]
    add_records(book, Tier.FIRM, again)
    second = book.tick(NOW + 2)
    assert second.firm.as_dict() == reference_tick(blocks, again, [], [], NOW + 2).firm


def _check_id_state(book: ModelBook) -> None:
    for run in (book._bids.main, book._bids.pend):
        assert (run.id_state == run.state[run.pos]).all()
        assert (run.pos[run.rank] == np.arange(len(run.rank))).all()


def test_bids_below_the_lowest_free_floor_lose_without_a_search():
    # Floors 300 and 400 with free GPUs: bids below 300 cannot be placed, and the walk stops at
    # the first of them once the highest structurally eligible losing limit is known ...
    blocks = [block(1, floor=300, gpus=4), block(2, floor=400, gpus=1)]
    bids = [bid(1, limit=500), bid(2, limit=450, gpus=2), bid(3, limit=420, duration=99 * H),
            bid(4, limit=290), bid(5, limit=250, gpus=4), bid(6, limit=200, duration=99 * H)]
    res = check_spot(blocks, bids)
    assert res.fill_bid_id.tolist() == [1, 2]
    # ... and when it is not known yet, the walk goes on without searching until it is.
    bids = [bid(1, limit=250, duration=99 * H), bid(2, limit=240, gpus=16), bid(3, limit=230),
            bid(4, limit=220)]
    res = check_spot(blocks, bids)
    assert res.price == -1 and res.indicative == 300
    res = check_spot([block(1, floor=300, gpus=4, free=0), block(2, floor=400, gpus=1)], bids)
    assert res.indicative == 400


def test_bid_id_ordered_state_follows_cancels_fills_and_merges():
    blocks = [block(i, floor=100 * i, gpus=4) for i in range(1, 6)]
    spot = [bid(i, limit=50 * i, gpus=1 + i % 4, seq=1000 - i) for i in range(1, 30)]
    book = book_from_records(blocks, spot[:5], spot)
    _check_id_state(book)
    book.remove_bids(Tier.SPOT, np.array([3, 17, 29, 999]))
    _check_id_state(book)
    book.tick(NOW)
    _check_id_state(book)
    add_records(book, Tier.SPOT, [bid(100 + i, limit=700 - i, seq=2000 + i) for i in range(5)])
    book.remove_bids(Tier.SPOT, np.array([101, 5]))
    _check_id_state(book)
    book.tick(NOW + 2)
    _check_id_state(book)
    book.compact()
    _check_id_state(book)


def test_multi_host_bounds_kept_between_ticks_follow_free_patches():
    # Two fabrics of whole hosts; gangs of 16 take two hosts each.  Between ticks free counts go
    # down and back up (patched in place): the multi-host structures kept from the last tick
    # must follow, in the fabrics touched, as a fresh book would see them.
    blocks = [block(i, floor=100 + 10 * i, fabric=1 + i // 4) for i in range(8)]
    spot = [bid(100 + i, limit=1000 - i, gpus=16) for i in range(3)]
    book = book_from_records(blocks, [], spot)
    book.tick(NOW)
    later = [bid(200 + i, limit=900 - i, gpus=16, seq=300 + i) for i in range(3)]
    add_records(book, Tier.SPOT, later)
    for step, frees in enumerate(([8, 8, 0, 8, 8, 8, 8, 0], [8, 0, 8, 8, 3, 8, 8, 8],
                                  [8, 8, 8, 8, 8, 8, 8, 8])):
        current = [dict(b, free=f) for b, f in zip(blocks, frees, strict=True)]
        upsert_records(book, current)
        live = [b for b in later if b["bid_id"] in book_tick_losers(book, Tier.SPOT)]
        now = NOW + 2 * (step + 1)
        result = book.tick(now)
        assert result.spot.as_dict() == reference_tick(current, [], live, [], now).spot


def test_walk_stops_at_the_first_bid_below_the_highest_accepted_floor():
    # Bid 1 takes the 500-floor block (the cheap one is too small), so max_floor = 500: bids
    # 3-5 lose by rule 1 although a cheaper block has room; the price still needs a loser.
    blocks = [block(1, floor=100, gpus=1), block(2, floor=500, gpus=4)]
    bids = [bid(1, limit=900, gpus=4), bid(2, limit=800, gpus=16), bid(3, limit=450),
            bid(4, limit=400), bid(5, limit=120, gpus=2)]
    res = check_spot(blocks, bids)
    assert res.fill_bid_id.tolist() == [1]
    assert res.price == 500


def test_a_kept_result_is_not_overwritten_by_later_ticks():
    # Loser rows are written into buffers the book reuses only when no earlier result holds them.
    blocks = [block(1, floor=300, gpus=1)]
    book = book_from_records(blocks, [], [bid(i, limit=100 + i) for i in range(1, 6)])
    first = book.tick(NOW)
    kept = first.spot.as_dict()

    book.remove_bids(Tier.SPOT, np.array([1, 2]))
    book.add_bids(Tier.SPOT, *columns([bid(9, limit=50)], BID_FIELDS))
    second = book.tick(NOW + 2)
    book.tick(NOW + 4)

    assert first.spot.as_dict() == kept
    assert second.spot.loser_bid_id.tolist() == [3, 4, 5, 9]


def test_multi_host_tie_goes_to_the_lowest_fabric_id_whatever_the_index_order():
    # The index orders fabrics by reclaim profile (fabric 2's shorter notice comes first), but
    # two fabrics that tie on highest floor and hosts go to the lower fabric_id.
    blocks = [block(1, fabric=1, notice=600), block(2, fabric=1, notice=600),
              block(3, fabric=2, notice=120), block(4, fabric=2, notice=120)]
    bids = [bid(1, limit=500, gpus=16)]

    res = check_spot(blocks, bids)

    assert res.fill_block_id.tolist() == [1, 2]
