"""Hostile bytes against a real `gpux serve`: each class of request that used to answer 500 now gets a
4xx in the one error shape `{"error": {"code", "message", "field"}}` naming the field, and changes
nothing (no bid, offer, reclaim or report stored; balances as they were). Tracebacks go to the log
only for 5xx, so none of these leaves one there."""
from __future__ import annotations

import pytest

from tests.e2e.client import Api, in_hours, unique

HUGE = 2**64  # past bigint (and past uint64's last value)
BIGINT_MAX = 2**63 - 1
NON_ASCII_DIGITS = ["²", "١٢", "１２", "12²"]


def assert_refused(response, field: str | None, statuses=(400, 422)) -> dict:
    assert response.status_code in statuses, f"{response.status_code} {response.text}"
    body = response.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert isinstance(error["code"], str) and isinstance(error["message"], str), body
    if field is not None:
        assert error.get("field") == field, body
    return error


@pytest.fixture
async def market(admin: Api):
    """An owner with an 8-GPU host and a live offer, and a tenant with 1,000 USD."""
    owner = await admin.new_account("owner")
    host, agent = await owner.new_host(gpus=8)
    offer = await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": 8, "floor_price": "1.00",
                                                            "available_until": in_hours(24)})
    tenant = await admin.new_account("tenant", deposit="1000.00")
    return {"owner": owner, "agent": agent, "host": host, "offer": offer, "tenant": tenant}


async def _balance(api: Api) -> dict:
    return await api.ok("GET", "/v1/accounts/me/balance")


async def _bids(tenant: Api) -> list[dict]:
    return (await tenant.ok("GET", "/v1/bids"))["items"]


def _bid(**overrides) -> dict:
    body = {"market": "H100-80GB/spot", "gpus": 1, "duration_s": 3600, "limit_price": "2.00",
            "client_order_id": unique("c")}
    body.update(overrides)
    return body


# --- integers past bigint in paths ------------------------------------------------------------

@pytest.mark.parametrize(("role", "method", "path", "field"), [
    ("tenant", "GET", "/v1/bids/{n}", "bid_id"),
    ("tenant", "DELETE", "/v1/bids/{n}", "bid_id"),
    ("tenant", "GET", "/v1/bids/{n}/cost", "bid_id"),
    ("tenant", "GET", "/v1/leases/{n}", "lease_id"),
    ("owner", "GET", "/v1/hosts/{n}", "host_id"),
    ("owner", "GET", "/v1/hosts/{n}/earnings", "host_id"),
    ("owner", "GET", "/v1/offers/{n}", "offer_id"),
    ("owner", "DELETE", "/v1/offers/{n}", "offer_id"),
    ("owner", "GET", "/v1/reclaims/{n}", "reclaim_id"),
    ("owner", "DELETE", "/v1/reclaims/{n}", "reclaim_id"),
    ("admin", "GET", "/v1/accounts/{n}/balance", "account_id"),
])
@pytest.mark.parametrize("number", [HUGE, BIGINT_MAX + 1, 10**30])
async def test_an_id_past_bigint_in_a_path_is_a_4xx_naming_it(admin: Api, market, role, method, path, field,
                                                             number: int) -> None:
    api = admin if role == "admin" else market[role]
    response = await api.request(method, path.format(n=number))
    assert_refused(response, field)


async def test_a_deposit_to_an_account_id_past_bigint_credits_nothing(admin: Api, market) -> None:
    tenant = market["tenant"]
    before = await _balance(tenant)
    response = await admin.request("POST", f"/v1/accounts/{HUGE}/deposits",
                                   json={"amount": "5.00", "idempotency_key": unique("k")})
    assert_refused(response, "account_id")
    assert await _balance(tenant) == before


async def test_the_largest_bigint_id_is_simply_not_found(market) -> None:
    response = await market["tenant"].request("GET", f"/v1/bids/{BIGINT_MAX}")
    assert_refused(response, None, statuses=(404,))


# --- integers past bigint in bodies -----------------------------------------------------------

async def test_an_offer_for_a_host_id_past_bigint_is_refused_and_stores_nothing(market) -> None:
    owner = market["owner"]
    offers_before = (await owner.ok("GET", "/v1/offers"))["items"]
    response = await owner.request("POST", "/v1/offers", json={
        "host_id": HUGE, "gpus": 1, "floor_price": "1.00", "available_until": in_hours(48)})
    assert_refused(response, "host_id")
    assert (await owner.ok("GET", "/v1/offers"))["items"] == offers_before


async def test_a_reclaim_on_a_host_id_past_bigint_is_refused_and_stores_nothing(market) -> None:
    owner = market["owner"]
    response = await owner.request("POST", "/v1/reclaims", json={"model": "H100-80GB", "gpus": 1, "host_id": HUGE})
    assert_refused(response, "host_id")
    assert (await owner.ok("GET", "/v1/reclaims"))["items"] == []


async def test_a_meter_report_with_a_seq_past_bigint_is_refused_and_the_next_seq_still_works(market) -> None:
    agent = market["agent"]
    response = await agent.request("POST", "/v1/agent/meter", json={"seq": HUGE, "samples": []})
    assert_refused(response, "seq")
    ack = await agent.ok("POST", "/v1/agent/meter", json={"seq": 0, "samples": []})
    assert ack["seq"] == 0 and not ack["duplicate"]


async def test_a_meter_seq_at_the_bigint_end_is_refused_so_its_successor_still_fits(market) -> None:
    """The server computes the next expected seq (max + 1): a report at 2**63-1 used to be stored and
    every later report of the host then failed with 500."""
    agent = market["agent"]
    assert_refused(await agent.request("POST", "/v1/agent/meter", json={"seq": BIGINT_MAX, "samples": []}), "seq")
    ack = await agent.ok("POST", "/v1/agent/meter", json={"seq": BIGINT_MAX - 1, "samples": []})
    assert ack["seq"] == BIGINT_MAX - 1
    later = await agent.ok("POST", "/v1/agent/meter", json={"seq": 7, "samples": []})
    assert later["seq"] == 7 and not later["duplicate"]
    replay = await agent.request("POST", "/v1/agent/meter", json={"seq": BIGINT_MAX - 1, "samples": [
        {"uuid": "GPU-not-here-0000", "ts": in_hours(-1), "util": 1, "mem_used_mb": 1, "power_mw": 1, "energy_mj": 1,
         "temp_c": 40, "healthy": True}]})
    assert replay.status_code in (409, 422), replay.text


async def test_an_inventory_gpu_index_past_int_is_refused_and_the_inventory_is_kept(market) -> None:
    agent, host = market["agent"], market["host"]
    before = await agent.ok("GET", f"/v1/hosts/{host['id']}")
    gpus = [{"uuid": g["uuid"], "model": g["model"], "memory_mb": g["memory_mb"], "index": HUGE} for g in before["gpus"]]
    response = await agent.request("PUT", "/v1/agent/inventory", json={"gpus": gpus})
    error = assert_refused(response, None)
    assert "index" in error["message"]
    assert (await agent.ok("GET", f"/v1/hosts/{host['id']}"))["gpus"] == before["gpus"]


# --- cursors ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("role", "path"), [("tenant", "/v1/bids"), ("tenant", "/v1/accounts/me/ledger"),
                                            ("tenant", "/v1/leases"), ("agent", "/v1/agent/leases")])
@pytest.mark.parametrize("cursor", [str(HUGE), "9" * 30, *NON_ASCII_DIGITS, "-1", "1 ", " 1", "1\n"])
async def test_a_cursor_not_of_ascii_digits_within_bigint_is_a_422_naming_it(market, role, path, cursor) -> None:
    response = await market[role].request("GET", path, params={"cursor": cursor})
    assert_refused(response, "cursor", statuses=(422,))


async def test_a_cursor_at_the_bigint_end_still_pages(market) -> None:
    page = await market["tenant"].ok("GET", "/v1/accounts/me/ledger", params={"cursor": str(BIGINT_MAX)})
    assert page["items"], page


# --- money --------------------------------------------------------------------------------------

BAD_AMOUNTS = ["2.5\n", "2.5\n\n", "2.5 ", "1.0000001", "1000000000000", "²", "-1", "1e3"]


@pytest.mark.parametrize("amount", BAD_AMOUNTS)
async def test_a_bid_whose_limit_price_is_not_a_whole_money_string_is_refused(market, amount: str) -> None:
    tenant = market["tenant"]
    before = await _balance(tenant)
    bids_before = await _bids(tenant)
    response = await tenant.request("POST", "/v1/bids", json=_bid(limit_price=amount))
    assert_refused(response, "limit_price")
    assert await _balance(tenant) == before
    assert await _bids(tenant) == bids_before


@pytest.mark.parametrize("amount", BAD_AMOUNTS)
async def test_a_deposit_whose_amount_is_not_a_whole_money_string_credits_nothing(admin: Api, market,
                                                                                  amount: str) -> None:
    tenant = market["tenant"]
    before = await _balance(tenant)
    response = await admin.request("POST", f"/v1/accounts/{tenant.account_id}/deposits",
                                   json={"amount": amount, "idempotency_key": unique("k")})
    assert_refused(response, "amount")
    assert await _balance(tenant) == before


@pytest.mark.parametrize("amount", BAD_AMOUNTS)
async def test_an_offer_whose_floor_price_is_not_a_whole_money_string_stores_nothing(market, amount: str) -> None:
    owner = market["owner"]
    offers_before = (await owner.ok("GET", "/v1/offers"))["items"]
    response = await owner.request("POST", "/v1/offers", json={
        "host_id": market["host"]["id"], "gpus": 1, "floor_price": amount, "available_until": in_hours(48),
        "available_from": in_hours(30)})
    assert_refused(response, "floor_price")
    assert (await owner.ok("GET", "/v1/offers"))["items"] == offers_before


async def test_a_hold_past_bigint_is_a_422_and_holds_nothing(market) -> None:
    """The largest price on the wire x 1,024 GPUs x 30 days is about 7e23 micro-dollars."""
    tenant = market["tenant"]
    before = await _balance(tenant)
    response = await tenant.request("POST", "/v1/bids", json=_bid(
        limit_price="999999999999.999999", gpus=1024, duration_s=30 * 24 * 3600))
    assert_refused(response, "limit_price", statuses=(422,))
    assert await _balance(tenant) == before
    assert await _bids(tenant) == []


async def test_a_hold_within_bigint_but_beyond_the_funds_is_a_402(market) -> None:
    tenant = market["tenant"]
    before = await _balance(tenant)
    response = await tenant.request("POST", "/v1/bids", json=_bid(limit_price="999999999999.999999", gpus=1,
                                                                  duration_s=3600))
    error = assert_refused(response, None, statuses=(402,))
    assert error["code"] == "insufficient_funds"
    assert await _balance(tenant) == before


async def test_deposits_past_the_books_range_are_a_422_and_credit_nothing(admin: Api) -> None:
    """Ten of the largest deposits would take the world book (minus every deposit) past bigint."""
    tenant = await admin.new_account("tenant")
    largest = "999999999999.999999"
    refused = None
    for _ in range(10):
        response = await admin.request("POST", f"/v1/accounts/{tenant.account_id}/deposits",
                                       json={"amount": largest, "idempotency_key": unique("k")})
        if response.status_code != 201:
            refused = response
            break
        before = await _balance(tenant)
    assert refused is not None, "ten deposits of 10**18 micro-dollars fit a bigint book?"
    assert_refused(refused, "amount", statuses=(422,))
    assert await _balance(tenant) == before


# --- times past what Python and PostgreSQL convert ----------------------------------------------
# Year 10000 and year 0 in UTC: valid RFC 3339 texts whose UTC instant Python's datetime cannot hold.
PAST_THE_END = "9999-12-31T23:59:59-14:00"
BEFORE_THE_START = "0001-01-01T00:00:00+14:00"


@pytest.mark.parametrize("moment", [PAST_THE_END, BEFORE_THE_START])
@pytest.mark.parametrize("field", ["available_until", "available_from", "firm_until"])
async def test_an_offer_time_out_of_range_is_a_422_naming_it_and_stores_nothing(market, moment, field) -> None:
    owner = market["owner"]
    offers_before = (await owner.ok("GET", "/v1/offers"))["items"]
    body = {"host_id": market["host"]["id"], "gpus": 1, "floor_price": "1.00", "available_until": in_hours(48),
            "available_from": in_hours(30)}
    body[field] = moment
    assert_refused(await owner.request("POST", "/v1/offers", json=body), field, statuses=(422,))
    assert (await owner.ok("GET", "/v1/offers"))["items"] == offers_before


@pytest.mark.parametrize("moment", [PAST_THE_END, BEFORE_THE_START])
async def test_a_bid_expiry_out_of_range_is_a_422_and_holds_nothing(market, moment: str) -> None:
    tenant = market["tenant"]
    before = await _balance(tenant)
    response = await tenant.request("POST", "/v1/bids", json=_bid(expire_at=moment))
    assert_refused(response, "expire_at", statuses=(422,))
    assert await _balance(tenant) == before
    assert await _bids(tenant) == []


@pytest.mark.parametrize("moment", [PAST_THE_END, BEFORE_THE_START])
@pytest.mark.parametrize("field", ["at", "until"])
async def test_a_reclaim_time_out_of_range_is_a_422_and_stores_nothing(market, moment: str, field: str) -> None:
    owner = market["owner"]
    response = await owner.request("POST", "/v1/reclaims", json={"model": "H100-80GB", "gpus": 1, field: moment})
    assert_refused(response, field, statuses=(422,))
    assert (await owner.ok("GET", "/v1/reclaims"))["items"] == []


@pytest.mark.parametrize("moment", [PAST_THE_END, BEFORE_THE_START, "2026-01-01T00:00:00"])
@pytest.mark.parametrize("field", ["start", "end"])
async def test_a_candle_window_out_of_range_or_without_a_zone_is_a_422(admin: Api, market, moment, field) -> None:
    response = await admin.request("GET", "/v1/markets/H100-80GB/spot/candles", params={field: moment})
    assert_refused(response, field, statuses=(422,))


async def test_a_meter_sample_before_the_epoch_in_utc_is_refused_and_the_report_not_stored(market) -> None:
    agent, host = market["agent"], market["host"]
    uuid = (await agent.ok("GET", f"/v1/hosts/{host['id']}"))["gpus"][0]["uuid"]
    sample = {"uuid": uuid, "ts": BEFORE_THE_START, "util": 1, "mem_used_mb": 1, "power_mw": 1, "energy_mj": 1,
              "temp_c": 40, "healthy": True}
    response = await agent.request("POST", "/v1/agent/meter", json={"seq": 1, "samples": [sample]})
    assert_refused(response, "samples", statuses=(422,))
    ack = await agent.ok("POST", "/v1/agent/meter", json={"seq": 1, "samples": []})
    assert not ack["duplicate"]  # seq 1 was not taken by the refused report


# --- text the database cannot hold, patterns matched whole --------------------------------------

@pytest.mark.parametrize("client_order_id", ["a\x00b", "line\n", "\x1b[31m"])
async def test_a_client_order_id_with_control_characters_is_refused(market, client_order_id: str) -> None:
    tenant = market["tenant"]
    response = await tenant.request("POST", "/v1/bids", json=_bid(client_order_id=client_order_id))
    assert_refused(response, "client_order_id")
    assert await _bids(tenant) == []


async def test_a_deposit_key_with_a_nul_byte_credits_nothing(admin: Api, market) -> None:
    tenant = market["tenant"]
    before = await _balance(tenant)
    response = await admin.request("POST", f"/v1/accounts/{tenant.account_id}/deposits",
                                   json={"amount": "1.00", "idempotency_key": "k\x00"})
    assert_refused(response, "idempotency_key")
    assert await _balance(tenant) == before


@pytest.mark.parametrize("model", ["H100%00", "H100%0A", "x" * 100])
async def test_a_market_path_the_database_cannot_hold_is_a_4xx(admin: Api, model: str) -> None:
    response = await admin.request("GET", f"/v1/markets/{model}/spot/book")
    assert_refused(response, None, statuses=(400, 404))


@pytest.mark.parametrize("name", ["acme\n", "acme\x00"])
async def test_an_account_name_with_a_trailing_newline_is_refused(admin: Api, name: str) -> None:
    response = await admin.request("POST", "/v1/accounts", json={"name": name, "role": "tenant"})
    assert_refused(response, "name")


# --- bodies that exhaust a decoder ---------------------------------------------------------------

@pytest.mark.parametrize(("role", "method", "path"), [("tenant", "POST", "/v1/bids"), ("admin", "POST", "/v1/accounts"),
                                                      ("agent", "PUT", "/v1/agent/inventory")])
async def test_json_nested_too_deep_is_a_400(admin: Api, market, role, method, path) -> None:
    api = admin if role == "admin" else market[role]
    depth = 100_000
    response = await api.request(method, path, content=b"[" * depth + b"]" * depth,
                                 headers={"content-type": "application/json"})
    error = assert_refused(response, None, statuses=(400,))
    assert error["code"] == "malformed_body"


@pytest.mark.parametrize("content_type", ["application/json; charset=latin1", "application/json"])
async def test_a_body_that_is_not_utf8_is_a_400_and_creates_nothing(admin: Api, content_type: str) -> None:
    name = unique("acct")
    response = await admin.request("POST", "/v1/accounts", content=b'{"name":"' + name.encode() + b'\xe9","role":"tenant"}',
                                   headers={"content-type": content_type})
    error = assert_refused(response, None, statuses=(400,))
    assert error["code"] == "malformed_body"
    assert (await admin.request("POST", "/v1/accounts", json={"name": name, "role": "tenant"})).status_code == 201


# --- OPTIONS ------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["/v1/bids", "/v1/bids/1", "/v1/leases", "/v1/agent/me", "/v1/agent/meter",
                                  "/v1/agent/leases", "/v1/reclaims", "/v1/reclaims/1", "/v1/accounts",
                                  "/v1/hosts", "/v1/markets"])
@pytest.mark.parametrize("key", ["none", "tenant"])
async def test_options_on_any_route_answers_204_without_a_key(admin: Api, market, path: str, key: str) -> None:
    """A CORS preflight carries no key: Litestar's own OPTIONS answer (204, Allow), never the guard's
    500. No CORS headers: the API is not meant for other origins' pages."""
    api = admin.as_key(None) if key == "none" else market["tenant"]
    response = await api.request("OPTIONS", path, headers={"Origin": "http://elsewhere.example",
                                                           "Access-Control-Request-Method": "POST"})
    assert response.status_code == 204, response.text
    assert "OPTIONS" in response.headers["allow"]
    assert response.content == b""


@pytest.mark.parametrize(("path", "methods"), [("/v1/bids", {"GET", "POST"}), ("/v1/bids/1", {"GET", "DELETE"}),
                                               ("/v1/offers/1", {"GET", "DELETE"}), ("/v1/reclaims", {"GET", "POST"})])
async def test_options_allows_every_method_its_path_serves(admin: Api, market, path: str, methods: set[str]) -> None:
    """Each of these paths is served by separate handlers; Litestar's own answer named only the first."""
    response = await market["tenant"].request("OPTIONS", path)
    assert response.status_code == 204, response.text
    assert set(response.headers["allow"].split(", ")) == methods | {"OPTIONS"}


# --- logs -----------------------------------------------------------------------------------------

async def test_refusals_leave_no_traceback_in_the_log(server, admin: Api, market) -> None:
    tenant = market["tenant"]
    for response in [await tenant.request("GET", f"/v1/bids/{HUGE}"),
                     await tenant.request("GET", "/v1/bids/12345"),
                     await tenant.request("POST", "/v1/bids", json=_bid(limit_price="2.5\n")),
                     await tenant.request("POST", "/v1/bids", json={"market": 1}),
                     await tenant.request("GET", "/v1/reclaims")]:
        assert 400 <= response.status_code < 500
    assert "Traceback" not in server.log(), server.log()[-3000:]
