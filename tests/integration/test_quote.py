"""A quote is what the next tick does: on seeded random books (hosts with assorted floors, reclaim
notices, hazards, firm windows and fabrics; resting firm and spot bids that lost the earlier ticks),
the quote of random terms says fill or not, the price, the reason and the shortfall that the same
bid, placed and cleared at the same moment, then gets; and quoting writes nothing."""
from __future__ import annotations

import random
from datetime import timedelta

import msgspec

from exchange.bids.quote import quote_bid
from exchange.bids.schemas import Bid, BidCreate, Quote, QuoteRequest
from exchange.bids.service import place_bid
from exchange.core.money import format_money
from tests.integration.scenario import Scenario

MODELS = 24
HOUR_S = 3600


def random_terms(rng: random.Random, model: str) -> dict:
    return {"market": f"{model}/{rng.choice(['spot', 'spot', 'firm'])}", "gpus": rng.choice([1, 2, 4, 8, 12, 16]),
            "duration_s": rng.choice([1, 3, 40]) * HOUR_S, "limit_price": rng.choice(["0.80", "1.20", "1.60", "2.40"]),
            "min_survival": rng.choice([0.0, 0.0, 0.5, 0.95]), "min_notice_s": rng.choice([0, 0, 120, 400])}


async def place(s: Scenario, tenant: int, terms: dict, coid: str) -> Bid:
    bid, _ = await place_bid(s.ctx, tenant, BidCreate(**terms, client_order_id=coid))
    return bid


async def stored_counts(s: Scenario) -> tuple:
    return tuple(await s.ctx.pool.fetchrow(
        "SELECT (SELECT count(*) FROM bids), (SELECT count(*) FROM leases), (SELECT count(*) FROM postings),"
        " (SELECT count(*) FROM market_ticks), (SELECT sum(balance) FILTER (WHERE kind = 'available')"
        "   FROM ledger_accounts)"))


async def arrange(s: Scenario, rng: random.Random, model: str, tenants: list[int]) -> None:
    for h in range(rng.randint(1, 3)):
        await s.add_host(f"{model}-h{h}", model=model, gpus=rng.choice([4, 8]), floor=rng.choice(["1.00", "1.50"]),
                         firm_hours=rng.choice([None, 2, 30]), fabric=rng.choice(["pod-a", "pod-b"]),
                         reclaim_notice_s=rng.choice([60, 120, 300]), reclaim_rate_per_h=rng.choice([0.0, 0.1, 1.0]))
    for b in range(rng.randint(0, 6)):
        await place(s, rng.choice(tenants), random_terms(rng, model), f"{model}-{b}")


async def test_quotes_agree_with_the_next_tick_on_random_books(s: Scenario) -> None:
    # Arrange: one model per probe (models clear independently, so one tick answers them all).
    # Half the models are settled (ticked until every resting bid loses tick after tick); the other
    # half are fresh, never ticked: there the quoted bid competes with bids that win too, in both
    # tiers (one priority walk clears a model's firm and spot bids over the same GPUs).
    rng = random.Random(20261129)
    models = [f"R{i}-80GB" for i in range(MODELS)]
    await s.market(model=models[0], gpus=8, floor="1.00")
    tenants = [await s.new_tenant(f"t{i}", "100000.00") for i in range(3)]
    prober = await s.new_tenant("prober", "100000.00")
    settled, fresh = models[: MODELS // 2], models[MODELS // 2:]
    for model in settled:
        await arrange(s, rng, model, tenants)
    await s.tick()
    await s.tick()
    for model in fresh:
        await arrange(s, rng, model, tenants)

    # Act: quote random terms in each model, then place them and clear once at the same moment.
    probes = [QuoteRequest(**random_terms(rng, model)) for model in models]
    before = await stored_counts(s)
    quotes: list[Quote] = [await quote_bid(s.ctx, prober, probe) for probe in probes]
    assert await stored_counts(s) == before
    placed = [await place(s, prober, msgspec.structs.asdict(p), f"probe-{i}") for i, p in enumerate(probes)]
    await s.tick()

    # Assert: each quote is what its bid got.
    outcomes = set()
    for probe, quote, bid in zip(probes, quotes, placed):
        row = await s.ctx.pool.fetchrow("SELECT status, unfilled_reason, unfilled_shortfall FROM bids WHERE id = $1",
                                        bid.id)
        prices = {p for (p,) in await s.ctx.pool.fetch("SELECT price FROM leases WHERE bid_id = $1", bid.id)}
        got = (row["status"] == "filled", {format_money(p) for p in prices} or None, row["unfilled_reason"],
               None if row["unfilled_shortfall"] is None else format_money(row["unfilled_shortfall"]))
        said = (quote.would_fill, {quote.price} if quote.price else None, quote.unfilled_reason,
                quote.unfilled_shortfall)
        assert said == got, (probe, quote)
        outcomes.add(quote.unfilled_reason)
    # The seed exercises fills and several reasons, or the comparison proves little.
    assert None in outcomes and len(outcomes) >= 4, outcomes


async def test_a_bid_past_its_expire_at_is_not_in_the_quoted_book(s: Scenario) -> None:
    # Arrange: a 4-GPU host and a good-till-date bid for all of it at 3.00, still open in the
    # database after its expire_at (the next tick would expire it before clearing).
    await s.market(model="X-80GB", gpus=4, floor="1.00")
    gtd = {"market": "X-80GB/spot", "gpus": 4, "duration_s": HOUR_S, "limit_price": "3.00",
           "expire_at": s.clock() + timedelta(seconds=10)}
    expiring = await place(s, s.tenant_id, gtd, "gtd")
    s.clock.advance(20)
    prober = await s.new_tenant("prober")
    terms = {"market": "X-80GB/spot", "gpus": 4, "duration_s": HOUR_S, "limit_price": "2.00"}

    # Act
    quote = await quote_bid(s.ctx, prober, QuoteRequest(**terms))

    # Assert: quoted as the tick clears it: the expired bid is gone, the GPUs are the prober's.
    assert (quote.would_fill, quote.price, quote.eligible_gpus) == (True, "1.00", 4), quote
    probe = await place(s, prober, terms, "probe")
    await s.tick()
    assert await s.ctx.pool.fetchval("SELECT status FROM bids WHERE id = $1", expiring.id) == "expired"
    assert await s.ctx.pool.fetchval("SELECT status FROM bids WHERE id = $1", probe.id) == "filled"
