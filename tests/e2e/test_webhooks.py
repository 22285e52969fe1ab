"""/v1/webhooks: an account's events POSTed to its URL, signed twice (Gpux-Signature, Stripe's scheme,
and Standard Webhooks' headers; both verified here by those projects' own packages), retried with
backoff while the receiver fails or is down, each delivery logged; internal destinations refused
unless the operator allows them, at create and at every attempt."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import subprocess
import sys
import time

import pytest
import standardwebhooks
import stripe

from tests.e2e.client import Api, in_seconds, unique
from tests.receivers import Receiver
from tests.support import ADMIN_KEY, run_audit, start_server

# Fast retries so a receiver's outage of a few attempts fits a test.
WEBHOOK_ENV = {"GPUX_WEBHOOK_RETRY_MIN_S": "0.2", "GPUX_WEBHOOK_RETRY_MAX_S": "1", "GPUX_WEBHOOK_TIMEOUT_S": "2"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, server_db: str):
    proc = start_server(tmp_path_factory.mktemp("server"), database_url=server_db, extra_env=WEBHOOK_ENV)
    yield proc
    proc.stop()


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """Gpux-Signature checked by hand, then both signatures by the verifiers receivers use: Stripe's
    (our header is its scheme, keyed by the whole secret) and the Standard Webhooks package."""
    parts = dict(item.split("=", 1) for item in headers["gpux-signature"].split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
    if not (hmac.compare_digest(expected, parts["v1"]) and abs(time.time() - int(parts["t"])) < 300):
        return False
    try:
        stripe.WebhookSignature.verify_header(body.decode(), headers["gpux-signature"], secret, tolerance=300)
    except stripe.SignatureVerificationError:
        return False
    try:
        standardwebhooks.Webhook(secret).verify(body, headers)
    except standardwebhooks.WebhookVerificationError:
        return False
    return True


async def filled_lease(admin: Api, tenant: Api) -> tuple[Api, str, dict]:
    """An owner's host with an offer, and the tenant's bid that fills it (fill + lease_started)."""
    owner = await admin.new_account("owner")
    model = f"W{unique('gpu').replace('-', '')}-80GB"
    host, _ = await owner.new_host(gpus=2, model=model, fabric=unique("pod"))
    await owner.ok("POST", "/v1/offers", 201, json={"host_id": host["id"], "gpus": 2, "floor_price": "1.00",
                                                    "available_until": in_seconds(7200), "reclaim_notice_s": 90})
    await tenant.ok("POST", "/v1/bids", 201, json={"market": f"{model}/spot", "gpus": 2, "duration_s": 3600,
                                                   "limit_price": "2.00", "client_order_id": unique("w")})
    return owner, model, host


async def test_events_arrive_signed_in_order_and_a_reclaim_notice_follows(admin: Api) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        tenant = await admin.new_account("tenant", deposit="100.00")
        hook = await tenant.ok("POST", "/v1/webhooks", 201, json={"url": receiver.url,
                                                                 "events": ["fill", "lease_started", "notice"]})
        assert hook["secret"].startswith("whsec_") and hook["events"] == ["fill", "lease_started", "notice"]
        owner, model, host = await filled_lease(admin, tenant)
        await receiver.wait_for(2)
        sent_at = time.monotonic()
        await owner.ok("POST", "/v1/reclaims", 201, json={"model": model, "gpus": 2, "host_id": host["id"]})
        answered_at = time.monotonic()
        await receiver.wait_for(3)
    finally:
        await receiver.stop()
    bodies = [json.loads(body) for _, body, _ in receiver.received]
    assert [(b["type"], b["seq"]) for b in bodies] == [("fill", 1), ("lease_started", 2), ("notice", 3)]
    assert all(verify(hook["secret"], headers, body) for headers, body, _ in receiver.received)
    # A body signed with another secret, or altered, does not verify: the check above can fail.
    headers, body, _ = receiver.received[0]
    assert not verify("whsec_other", headers, body) and not verify(hook["secret"], headers, body + b" ")
    tampered = body.replace(b'"fill"', b'"notice"')
    assert tampered != body
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        standardwebhooks.Webhook(hook["secret"]).verify(tampered, headers)
    with pytest.raises(stripe.SignatureVerificationError):
        stripe.WebhookSignature.verify_header(tampered.decode(), headers["gpux-signature"], hook["secret"], 300)
    # The Standard Webhooks message id is the receiver's dedupe key: one per message.
    assert len({h["webhook-id"] for h, _, _ in receiver.received}) == 3
    assert bodies[2]["data"]["status"] == "ending" and bodies[2]["channel"] == "stream"
    # The figure in the README (run with -s): the notice may reach the receiver before the reclaim's
    # answer reaches its caller (both follow the same commit).
    arrived_at = receiver.received[2][2]
    print(f"reclaim sent -> notice at the receiver: {(arrived_at - sent_at) * 1000:.1f} ms"
          f" (reclaim answered after {(answered_at - sent_at) * 1000:.1f} ms)")
    # The receiver has the notice once it answered; the server records it just after.
    async with asyncio.timeout(10):
        while True:
            log = (await tenant.ok("GET", f"/v1/webhooks/{hook['id']}/deliveries"))["items"]
            if all(d["delivered_at"] for d in log):
                break
            await asyncio.sleep(0.05)
    assert [(d["kind"], d["seq"], d["attempts"], d["last_status_code"]) for d in log] == [
        ("notice", 3, 1, 200), ("lease_started", 2, 1, 200), ("fill", 1, 1, 200)]
    assert all(d["delivered_at"] and d["next_attempt_at"] is None for d in log)


async def test_a_failing_then_down_receiver_gets_the_event_later(admin: Api) -> None:
    receiver = Receiver(answer=500)
    await receiver.start()
    tenant = await admin.new_account("tenant", deposit="100.00")
    hook = await tenant.ok("POST", "/v1/webhooks", 201, json={"url": receiver.url, "events": ["fill"]})
    path = f"/v1/webhooks/{hook['id']}/deliveries"
    try:
        await filled_lease(admin, tenant)

        async def log_until(check) -> list[dict]:
            async with asyncio.timeout(30):
                while not check(items := (await tenant.ok("GET", path))["items"]):
                    await asyncio.sleep(0.1)
            return items

        # Refused twice with a 500, then the receiver is down (connection refused) for two attempts.
        failed = await log_until(lambda items: items and items[0]["attempts"] >= 2)
        assert failed[0]["last_status_code"] == 500 and failed[0]["delivered_at"] is None
        assert failed[0]["next_attempt_at"] is not None and receiver.received == []
        await receiver.stop()
        down = await log_until(lambda items: items[0]["attempts"] >= 4)
        assert down[0]["last_status_code"] is None and "Connect" in down[0]["last_error"]
        receiver.answer = 200
        await receiver.start()
        await receiver.wait_for(1)
    finally:
        await receiver.stop()
    headers, body, _ = receiver.received[0]
    assert json.loads(body)["type"] == "fill" and verify(hook["secret"], headers, body)
    # Every retry of the message carried the same webhook-id (a receiver dedupes on it).
    assert len(receiver.seen) >= 3 and {h["webhook-id"] for h in receiver.seen} == {headers["webhook-id"]}
    done = await log_until(lambda items: items[0]["delivered_at"] is not None)
    assert done[0]["attempts"] >= 5 and done[0]["last_status_code"] == 200 and done[0]["last_error"] is None
    assert len(done) == 1  # lease_started was not subscribed: never sent


async def test_the_test_endpoint_sends_a_signed_ping(admin: Api) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        owner = await admin.new_account("owner")
        hook = await owner.ok("POST", "/v1/webhooks", 201, json={"url": receiver.url, "events": ["notice"]})
        queued = await owner.ok("POST", f"/v1/webhooks/{hook['id']}/test", 202)
        assert queued["kind"] == "ping" and queued["seq"] is None
        await receiver.wait_for(1)
    finally:
        await receiver.stop()
    headers, body, _ = receiver.received[0]
    ping = json.loads(body)
    assert ping["type"] == "ping" and ping["data"] == {"webhook_id": hook["id"]} and verify(hook["secret"], headers, body)


async def test_another_account_sees_no_webhook_and_bad_input_is_refused(admin: Api) -> None:
    tenant = await admin.new_account("tenant")
    other = await admin.new_account("tenant")
    hook = await tenant.ok("POST", "/v1/webhooks", 201, json={"url": "https://localhost/h", "events": ["fill"]})
    listed = (await tenant.ok("GET", "/v1/webhooks"))["items"]
    assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
    assert (await other.ok("GET", "/v1/webhooks"))["items"] == []
    for method, path in (("DELETE", f"/v1/webhooks/{hook['id']}"), ("GET", f"/v1/webhooks/{hook['id']}/deliveries"),
                         ("POST", f"/v1/webhooks/{hook['id']}/test"), ("POST", f"/v1/webhooks/{hook['id']}/enable")):
        response = await other.request(method, path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    for body in ({"url": "ftp://example.com/h", "events": ["fill"]}, {"url": "http://", "events": ["fill"]},
                 {"url": "https://example.com/h\n", "events": ["fill"]}, {"url": "https://x:99999/", "events": ["fill"]},
                 # A bracketed host that is no IPv6 address (urlsplit raises; was a 500):
                 {"url": "http://*5[h", "events": ["fill"]}, {"url": "https://[zz]/h", "events": ["fill"]},
                 {"url": "https://localhost/" + "a" * 3000, "events": ["fill"]},
                 {"url": "https://localhost/h", "events": []}, {"url": "https://localhost/h", "events": ["bogus"]},
                 {"url": "https://localhost/h"}):
        response = await tenant.request("POST", "/v1/webhooks", json=body)
        assert 400 <= response.status_code < 500 and "error" in response.json(), (body, response.text)
    response = await tenant.request("GET", "/v1/webhooks/99999999999999999999/deliveries")
    assert 400 <= response.status_code < 500
    admin_try = await admin.request("POST", "/v1/webhooks", json={"url": "https://localhost/h", "events": ["fill"]})
    assert admin_try.status_code == 403
    assert (await tenant.ok("GET", "/v1/webhooks"))["items"] == listed  # nothing refused was stored
    assert (await tenant.ok("DELETE", f"/v1/webhooks/{hook['id']}"))["id"] == hook["id"]
    assert (await tenant.ok("GET", "/v1/webhooks"))["items"] == []



async def test_events_wait_out_a_server_restart_and_two_processes_send_each_once(tmp_path, fresh_db: str) -> None:
    """The receiver is down while the events happen and while the server stops; once both are back
    (two server processes), it gets each event once, in order: queue and cursor live in the database."""
    receiver = Receiver()  # not started: down
    server = start_server(tmp_path / "a", database_url=fresh_db, extra_env=WEBHOOK_ENV, workers=2)
    try:
        async with Api(server.base_url, ADMIN_KEY) as admin:
            tenant = await admin.new_account("tenant", deposit="100.00")
            hook = await tenant.ok("POST", "/v1/webhooks", 201, json={"url": receiver.url,
                                                                     "events": ["fill", "lease_started"]})
            await filled_lease(admin, tenant)
            async with asyncio.timeout(30):
                while not (items := (await tenant.ok("GET", f"/v1/webhooks/{hook['id']}/deliveries"))["items"]) \
                        or items[-1]["attempts"] < 1:
                    await asyncio.sleep(0.1)
            assert items[-1]["delivered_at"] is None and items[-1]["last_error"]
    finally:
        server.stop()
    await receiver.start()
    server = start_server(tmp_path / "b", database_url=fresh_db, extra_env=WEBHOOK_ENV, workers=2)
    try:
        async with Api(server.base_url, tenant.key) as again:
            await receiver.wait_for(2)
            # A ping queued now is sent after anything still pending: a duplicate would come before it.
            await again.ok("POST", f"/v1/webhooks/{hook['id']}/test", 202)
            await receiver.wait_for(3)
            # The receiver has the ping once it answered; the server records it as delivered just after.
            async with asyncio.timeout(10):
                while True:
                    log = (await again.ok("GET", f"/v1/webhooks/{hook['id']}/deliveries"))["items"]
                    if log and all(d["delivered_at"] for d in log):
                        break
                    await asyncio.sleep(0.1)
    finally:
        server.stop()
        await receiver.stop()
    bodies = [json.loads(body) for _, body, _ in receiver.received]
    assert [(b["type"], b["seq"]) for b in bodies] == [("fill", 1), ("lease_started", 2), ("ping", None)]
    assert all(verify(hook["secret"], headers, body) for headers, body, _ in receiver.received)
    assert [(d["kind"], d["delivered_at"] is not None) for d in log] == [("ping", True), ("lease_started", True),
                                                                         ("fill", True)]
    audit = run_audit(fresh_db)
    assert audit.returncode == 0, audit.stdout


# Loopback in every spelling a URL parser or the C library accepts, and the other internal ranges.
INTERNAL_URLS = ["http://127.0.0.1:{port}/h", "http://localhost:{port}/h", "http://127.1:{port}/h",
                 "http://2130706433:{port}/h", "http://0x7f000001:{port}/h", "http://0177.0.0.1:{port}/h",
                 "http://127.0.0.1.:{port}/h", "http://[::ffff:127.0.0.1]:{port}/h", "http://0.0.0.0:{port}/h",
                 "http://0:{port}/h", "http://[::1]:{port}/h", "http://[::]:{port}/h", "http://LOCALHOST:{port}/h",
                 "http://a.localhost:{port}/h", "http://10.0.0.1/h", "http://192.168.1.1/h", "http://172.16.0.1/h",
                 "http://169.254.169.254/latest/meta-data", "http://100.64.0.1/h", "http://[fd00::1]/h",
                 "http://[fe80::1]/h", "http://224.0.0.1/h", "http://255.255.255.255/h", "http://192.0.2.1/h",
                 "http://[::ffff:169.254.169.254]/h", "http://[2002:7f00:1::]/h", "http://[64:ff9b::a00:1]/h"]


async def test_internal_destinations_are_refused_at_create_and_at_send(tmp_path, fresh_db: str) -> None:
    """With no allowance, every internal URL is a 422 on `url` and nothing is stored; a webhook that
    was allowed when created (the operator's allowance, since withdrawn) is refused at each attempt:
    the log says refused, the loopback receiver never hears of it."""
    receiver = Receiver()
    await receiver.start()
    allowed = start_server(tmp_path / "a", database_url=fresh_db, extra_env=WEBHOOK_ENV)
    try:
        async with Api(allowed.base_url, ADMIN_KEY) as admin:
            tenant = await admin.new_account("tenant")
            hook = await tenant.ok("POST", "/v1/webhooks", 201, json={"url": receiver.url, "events": ["fill"]})
    finally:
        allowed.stop()
    closed = start_server(tmp_path / "b", database_url=fresh_db,
                          extra_env={**WEBHOOK_ENV, "GPUX_WEBHOOK_ALLOWED_NETS": ""})
    try:
        async with Api(closed.base_url, tenant.key) as again:
            for url in INTERNAL_URLS:
                response = await again.request("POST", "/v1/webhooks", json={"url": url.format(port=receiver.port),
                                                                             "events": ["fill"]})
                assert response.status_code == 422, (url, response.text)
                error = response.json()["error"]
                assert error["field"] == "url" and ("address" in error["message"]), (url, error)
            assert [h["id"] for h in (await again.ok("GET", "/v1/webhooks"))["items"]] == [hook["id"]]
            await again.ok("POST", f"/v1/webhooks/{hook['id']}/test", 202)
            path = f"/v1/webhooks/{hook['id']}/deliveries"
            async with asyncio.timeout(30):
                while not (log := (await again.ok("GET", path))["items"]) or log[0]["attempts"] < 2:
                    await asyncio.sleep(0.1)
    finally:
        closed.stop()
        await receiver.stop()
    assert receiver.seen == []
    assert log[0]["last_status_code"] is None and log[0]["delivered_at"] is None
    assert log[0]["last_error"] == "refused: the host is a loopback address"


async def test_a_webhook_failing_too_long_is_disabled_and_can_be_enabled(tmp_path, fresh_db: str) -> None:
    receiver = Receiver(answer=500)
    await receiver.start()
    server = start_server(tmp_path, database_url=fresh_db,
                          extra_env={**WEBHOOK_ENV, "GPUX_WEBHOOK_DISABLE_AFTER_S": "1.5"})
    try:
        async with Api(server.base_url, ADMIN_KEY) as admin:
            tenant = await admin.new_account("tenant", deposit="100.00")
            hook = await tenant.ok("POST", "/v1/webhooks", 201, json={"url": receiver.url, "events": ["fill"]})
            assert hook["status"] == "active" and hook["failing_since"] is None
            await tenant.ok("POST", f"/v1/webhooks/{hook['id']}/test", 202)
            async with asyncio.timeout(30):
                while (listed := (await tenant.ok("GET", "/v1/webhooks"))["items"][0])["status"] != "disabled":
                    await asyncio.sleep(0.1)
            assert listed["failing_since"] and listed["disabled_at"] >= listed["failing_since"]
            # Disabled: nothing is tried any more, and what happens meanwhile waits for it.
            refused = receiver.refused
            await filled_lease(admin, tenant)
            await asyncio.sleep(1.5)
            assert receiver.refused == refused and receiver.received == []
            cli = subprocess.run([sys.executable, "-m", "exchange.cli", "webhooks"], capture_output=True, text=True,
                                 env={**os.environ, "GPUX_URL": server.base_url, "GPUX_API_KEY": tenant.key,
                                      "GPUX_CONFIG": str(tmp_path / "none.toml")}, timeout=60)
            assert cli.returncode == 0 and "disabled" in cli.stdout, cli.stdout + cli.stderr
            receiver.answer = 200
            enabled = await tenant.ok("POST", f"/v1/webhooks/{hook['id']}/enable")
            assert enabled["status"] == "active" and enabled["disabled_at"] is None
            await receiver.wait_for(2)  # the ping, then the fill that waited
    finally:
        server.stop()
        await receiver.stop()
    assert [json.loads(body)["type"] for _, body, _ in receiver.received] == ["ping", "fill"]
