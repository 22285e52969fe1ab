"""Issue 12: `POST /v1/bids/quote`, a dry run of a bid against the current book, checked against a
real `gpux serve` ticking every 0.5 s: what a quote says is what placing the same bid gets at the
next tick, and quoting changes nothing.

Each test trades a GPU model of its own, so its book holds only what it arranged. A book is
arranged to be stable between ticks (every resting bid loses on every tick until the quoted one
arrives), so the quote and the tick after the placement clear the same book."""
from __future__ import annotations


import asyncpg

from tests.e2e.client import Api, in_hours, unique
from tests.e2e.test_agent_settlement import until

HOUR_S = 3600


async def a_market(admin: Api, floor: str, gpus: int = 8, **offer: object) -> tuple[str, dict]:
    """A model of its own with one host of `gpus` GPUs offered at `floor` now; (model, host)."""
    owner = await admin.new_account("owner")
    model = f"Q{unique('gpu').replace('-', '')}-80GB"
    host, _ = await owner.new_host(gpus=gpus, model=model, fabric=unique("pod"))
    await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": gpus, "floor_price": floor,
                                                    "available_until": in_hours(24), **offer})
    return model, host


def terms(market: str, gpus: int, limit: str, **more: object) -> dict:
    return {"market": market, "gpus": gpus, "duration_s": HOUR_S, "limit_price": limit, **more}


async def place(tenant: Api, body: dict) -> dict:
    return await tenant.ok("POST", "/v1/bids", 201, json={**body, "client_order_id": unique("q")})


async def filled(tenant: Api, bid: dict) -> bool:
    return (await tenant.ok("GET", f"/v1/bids/{bid['id']}"))["status"] == "filled"


async def reason_of(tenant: Api, bid: dict) -> dict | None:
    """The bid once a tick has said why it did not fill."""
    now = await tenant.ok("GET", f"/v1/bids/{bid['id']}")
    return now if now["unfilled_reason"] is not None else None


async def quote(tenant: Api, body: dict) -> dict:
    return await tenant.ok("POST", "/v1/bids/quote", 200, json=body)


async def a_full_book(admin: Api, floor: str, held_gpus: int, resting_gpus: int, resting_limit: str) -> str:
    """A spot market whose 8-GPU host has `held_gpus` leased (a 5.00 lease nobody outbids) and a
    resting bid that loses every tick for want of free GPUs (no_capacity): its limit is the
    highest losing limit, the price a newcomer's fill would clear at."""
    model, _ = await a_market(admin, floor)
    market = f"{model}/spot"
    holder = await admin.new_account("tenant", deposit="500.00")
    held = await place(holder, terms(market, held_gpus, "5.00"))
    assert await until(lambda: filled(holder, held))
    waiting = await admin.new_account("tenant", deposit="500.00")
    resting = await place(waiting, terms(market, resting_gpus, resting_limit))
    stated = await until(lambda: reason_of(waiting, resting))
    assert stated["unfilled_reason"] == "no_capacity", stated
    return market


async def test_a_quote_that_fills_is_what_placing_the_bid_gets(admin: Api) -> None:
    # Arrange: 4 of 8 GPUs free at floor 1.80, an 8-GPU bid at 2.50 waiting for a whole host.
    market = await a_full_book(admin, floor="1.80", held_gpus=4, resting_gpus=8, resting_limit="2.50")
    me = await admin.new_account("tenant", deposit="100.00")
    body = terms(market, 4, "3.00")

    # Act
    answer = await quote(me, body)

    # Assert: it takes the 4 free GPUs at the highest losing limit (2.50, above the floor, below
    # its own 3.00); and placing the same bid fills at that price on the next tick.
    assert answer["would_fill"] is True and answer["price"] == "2.50", answer
    assert answer["eligible_gpus"] == 4 and answer["unfilled_reason"] is None and answer["unfilled_shortfall"] is None
    assert answer["hold"] == "12.00" and answer["available"] == "100.00"
    echoed = (answer["market"], answer["gpus"], answer["duration_s"], answer["limit_price"])
    assert echoed == (market, 4, HOUR_S, "3.00")
    bid = await place(me, body)
    assert await until(lambda: filled(me, bid)), "the quoted bid did not fill"
    [lease] = (await me.ok("GET", "/v1/leases"))["items"]
    assert lease["price"] == answer["price"] and lease["gpus"] == 4


async def test_a_quote_priced_out_gives_the_reason_and_shortfall_the_placed_bid_gets(admin: Api) -> None:
    # Arrange: the host fully leased, a 4-GPU bid at 2.50 waiting: the indicative price is 2.50.
    market = await a_full_book(admin, floor="1.00", held_gpus=8, resting_gpus=4, resting_limit="2.50")
    me = await admin.new_account("tenant", deposit="100.00")
    body = terms(market, 4, "2.10")

    # Act
    answer = await quote(me, body)

    # Assert: priced out by 0.40, as the bid placed with the same terms says after a tick.
    assert answer["would_fill"] is False and answer["price"] is None, answer
    assert (answer["unfilled_reason"], answer["unfilled_shortfall"]) == ("limit_below_price", "0.40")
    assert answer["eligible_gpus"] == 0  # nothing free now
    bid = await place(me, body)
    stated = await until(lambda: reason_of(me, bid))
    assert (stated["unfilled_reason"], stated["unfilled_shortfall"]) == ("limit_below_price", "0.40")
    assert stated["status"] == "open"


async def test_terms_no_supply_fits_get_the_reason_and_no_eligible_gpus(admin: Api) -> None:
    # Arrange: 8 free GPUs with a 120 s reclaim notice, a reclaim hazard of 0.5 per hour (survival
    # over an hour exp(-0.5) = 0.61) and no firm window.
    model, _ = await a_market(admin, "1.00", reclaim_notice_s=120, reclaim_rate_per_h=0.5)
    spot, firm = f"{model}/spot", f"{model}/firm"
    me = await admin.new_account("tenant", deposit="100.00")

    # Act
    easy = await quote(me, terms(spot, 2, "2.00"))
    notice = await quote(me, terms(spot, 2, "2.00", min_notice_s=600))
    survival = await quote(me, terms(spot, 2, "2.00", min_survival=0.9))
    no_window = await quote(me, terms(firm, 2, "2.00"))

    # Assert: terms the supply meets see its 8 free GPUs and fill at the floor; too demanding terms
    # see none, with the reason a resting bid gets.
    assert (easy["would_fill"], easy["price"], easy["eligible_gpus"]) == (True, "1.00", 8), easy
    for answer, reason in ((notice, "notice_too_long"), (survival, "survival_too_high"),
                           (no_window, "no_firm_window")):
        assert answer["would_fill"] is False and answer["eligible_gpus"] == 0, answer
        assert (answer["unfilled_reason"], answer["unfilled_shortfall"]) == (reason, None)
    placed = await place(me, terms(spot, 2, "2.00", min_notice_s=600))
    assert (await until(lambda: reason_of(me, placed)))["unfilled_reason"] == "notice_too_long"


async def test_a_quote_beyond_the_balance_says_insufficient_funds_and_by_how_much(admin: Api) -> None:
    model, _ = await a_market(admin, "1.00")
    market = f"{model}/spot"
    me = await admin.new_account("tenant", deposit="1.00")
    broke = await admin.new_account("tenant")
    body = terms(market, 8, "3.00")  # holds 8 x 3.00 x 1 h = 24.00

    answer = await quote(me, body)
    penniless = await quote(broke, body)

    # The market would fill it (8 eligible GPUs), but placing it is refused: it would never rest.
    assert answer["would_fill"] is False and answer["price"] is None and answer["eligible_gpus"] == 8, answer
    assert (answer["unfilled_reason"], answer["unfilled_shortfall"]) == ("insufficient_funds", "23.00")
    assert (answer["hold"], answer["available"]) == ("24.00", "1.00")
    assert (penniless["unfilled_shortfall"], penniless["available"]) == ("24.00", "0.00")
    refused = await me.request("POST", "/v1/bids", json={**body, "client_order_id": unique("q")})
    assert refused.status_code == 402 and refused.json()["error"]["code"] == answer["unfilled_reason"]


async def test_quoting_changes_nothing(admin: Api, server_db: str) -> None:
    # Arrange: 8 free GPUs, a 16-GPU bid that fits no host resting in the book, a tenant with an
    # open bid (so it has a hold) that quotes.
    model, _ = await a_market(admin, "1.00")
    market = f"{model}/spot"
    other = await admin.new_account("tenant", deposit="100.00")
    big = await place(other, terms(market, 16, "2.00"))
    assert (await until(lambda: reason_of(other, big)))["unfilled_reason"] == "too_large"
    me = await admin.new_account("tenant", deposit="100.00")
    mine = await place(me, terms(market, 1, "0.50"))  # below the floor: rests
    assert (await until(lambda: reason_of(me, mine)))["unfilled_reason"] == "limit_below_price"
    conn = await asyncpg.connect(server_db)
    try:
        async def stored() -> tuple:
            return tuple(await conn.fetchrow(
                "SELECT (SELECT count(*) FROM bids) AS bids, (SELECT count(*) FROM leases) AS leases,"
                " (SELECT count(*) FROM transfers WHERE account_id = $1) AS transfers,"
                " (SELECT count(*) FROM postings p JOIN ledger_accounts la ON la.id = p.ledger_account_id"
                "   WHERE la.account_id = $1) AS postings,"
                " (SELECT max(id) FROM bids) AS last_bid", me.account_id))

        async def ticks() -> int:
            return await conn.fetchval("SELECT count(*) FROM market_ticks WHERE market = $1", market)

        before, balance = await stored(), await me.ok("GET", "/v1/accounts/me/balance")

        # Act: quotes that would fill, and that would not.
        wins = await quote(me, terms(market, 4, "3.00"))
        loses = await quote(me, terms(market, 4, "0.10"))
        ticked = await ticks()
        # Two ticks after the quotes: a quote that had entered the leader's live book would fill there.
        assert await until(lambda: _more(ticks, ticked + 2))

        # Assert
        assert wins["would_fill"] and not loses["would_fill"]
        assert await stored() == before
        assert await me.ok("GET", "/v1/accounts/me/balance") == balance
        assert (await me.ok("GET", "/v1/leases"))["items"] == []
        assert [b["id"] for b in (await me.ok("GET", "/v1/bids", params={"status": "open"}))["items"]] == [mine["id"]]
        assert (await other.ok("GET", f"/v1/bids/{big['id']}"))["status"] == "open"
    finally:
        await conn.close()


async def _more(count, at_least: int) -> bool:
    return await count() >= at_least


async def test_bad_quotes_are_refused_in_the_error_shape(admin: Api) -> None:
    model, _ = await a_market(admin, "1.00")
    market = f"{model}/spot"
    me = await admin.new_account("tenant", deposit="100.00")
    owner = await admin.new_account("owner")
    good = terms(market, 1, "2.00")
    cases = [
        (me, {**good, "client_order_id": "x"}, (400, 422), None),  # no such field on a quote
        (me, {**good, "colour": "red"}, (400, 422), None),
        (me, {**good, "gpus": -1}, (400, 422), "gpus"),
        (me, {**good, "gpus": 0}, (400, 422), "gpus"),
        (me, {**good, "limit_price": "-1"}, (400, 422), "limit_price"),
        (me, {**good, "limit_price": "0"}, (422,), "limit_price"),
        (me, {**good, "duration_s": 0}, (422,), "duration_s"),
        (me, {**good, "min_survival": 1.5}, (400, 422), "min_survival"),
        (me, {**good, "market": "NOPE-80GB/spot"}, (422,), "market"),
        (me, {**good, "market": "no market"}, (400, 422), "market"),
        (me, {**good, "time_in_force": "gtd"}, (422,), "expire_at"),
        (me, {k: v for k, v in good.items() if k != "gpus"}, (400, 422), None),
        (owner, good, (403,), None),
        (me.as_key(None), good, (401,), None),
    ]
    for who, body, statuses, field in cases:
        response = await who.request("POST", "/v1/bids/quote", json=body)
        assert response.status_code in statuses, (body, response.status_code, response.text)
        error = response.json()["error"]
        assert error["code"] and error["message"], response.text
        if field is not None:
            assert error.get("field") == field, (body, response.text)
    not_json = await me.request("POST", "/v1/bids/quote", content=b"{", headers={"Content-Type": "application/json"})
    assert not_json.status_code == 400 and not_json.json()["error"]["code"]


async def test_a_market_with_no_supply_says_so(admin: Api) -> None:
    # A model a host has reported (so its markets exist) but nobody offers.
    owner = await admin.new_account("owner")
    model = f"Q{unique('gpu').replace('-', '')}-80GB"
    await owner.new_host(gpus=8, model=model, fabric=unique("pod"))
    me = await admin.new_account("tenant", deposit="100.00")

    answer = await quote(me, terms(f"{model}/firm", 1, "2.00"))

    assert (answer["would_fill"], answer["eligible_gpus"], answer["unfilled_reason"]) == (False, 0, "no_supply_window")
