from hypothesis import given, strategies as st

from exchange.reclaims.victims import VICTIM_STRATEGIES, CheapestFirst, FewestLeases, Gang


def gang(bid: int, gpus: int, price: int) -> Gang:
    return Gang(bid_id=bid, lease_ids=(bid * 10,), gpus=gpus, price=price)


def test_cheapest_first_takes_the_lowest_prices() -> None:
    gangs = [gang(1, 4, 300), gang(2, 4, 100), gang(3, 4, 200)]

    chosen = CheapestFirst().choose(gangs, 8)

    assert [g.bid_id for g in chosen] == [2, 3]


def test_at_one_price_the_fewest_leases() -> None:
    gangs = [gang(1, 2, 100), gang(2, 2, 100), gang(3, 4, 100)]

    assert [g.bid_id for g in CheapestFirst().choose(gangs, 4)] == [3]


def test_a_victim_the_others_cover_is_spared() -> None:
    # Greedy takes 2@1 then 8@2; 8@2 alone covers the need, so the 2-GPU lease keeps running.
    gangs = [gang(1, 2, 100), gang(2, 8, 200)]

    assert [g.bid_id for g in CheapestFirst().choose(gangs, 8)] == [2]


def test_fewest_leases_prefers_large_gangs() -> None:
    gangs = [gang(1, 2, 100), gang(2, 2, 100), gang(3, 4, 900)]

    assert [g.bid_id for g in FewestLeases().choose(gangs, 4)] == [3]


@given(st.lists(st.tuples(st.integers(1, 16), st.integers(1, 10**7)), max_size=30), st.integers(1, 64),
       st.sampled_from(sorted(VICTIM_STRATEGIES)))
def test_victims_cover_the_need_when_they_can_and_none_is_wasted(pairs, need, name) -> None:
    gangs = [gang(i + 1, g, p) for i, (g, p) in enumerate(pairs)]

    chosen = VICTIM_STRATEGIES[name].choose(gangs, need)

    total = sum(g.gpus for g in chosen)
    assert total >= min(need, sum(g.gpus for g in gangs))
    assert len({g.bid_id for g in chosen}) == len(chosen)
    if total >= need:  # every victim is needed: without any one of them the need is not covered
        assert all(total - g.gpus < need for g in chosen)
