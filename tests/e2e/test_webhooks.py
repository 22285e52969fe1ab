"""/v1/webhooks: an account's events POSTed to its URL, signed (Gpux-Signature, HMAC-SHA256 over
"<t>.<body>"), retried with backoff while the receiver fails or is down, each delivery logged."""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time

import pytest

from tests.e2e.client import Api, in_seconds, unique
from tests.support import ADMIN_KEY, free_port, run_audit, start_server

# Fast retries so a receiver's outage of a few attempts fits a test.
WEBHOOK_ENV = {"GPUX_WEBHOOK_RETRY_MIN_S": "0.2", "GPUX_WEBHOOK_RETRY_MAX_S": "1", "GPUX_WEBHOOK_TIMEOUT_S": "2"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, server_db: str):
    proc = start_server(tmp_path_factory.mktemp("server"), database_url=server_db, extra_env=WEBHOOK_ENV)
    yield proc
    proc.stop()


class Receiver:
    """A real HTTP server on a free port: records each POST (headers, body, arrival) and answers with
    the status in `answer` (500 to play a failing receiver); `stop()`/`start()` play one that is down."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.answer = 200
        self.received: list[tuple[dict[str, str], bytes, float]] = []
        self.refused = 0  # requests answered with a non-2xx
        self.arrived = asyncio.Event()
        self.server: asyncio.Server | None = None
        self.open: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def stop(self) -> None:
        self.server.close()
        for writer in list(self.open):  # kept-alive connections too: down means down
            writer.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, v in (l.split(":", 1) for l in lines[1:] if ":" in l)}
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                status = self.answer
                if status < 300:
                    self.received.append((headers, body, time.monotonic()))
                    self.arrived.set()
                else:
                    self.refused += 1
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.CancelledError, ConnectionError):
            pass
        finally:
            self.open.discard(writer)
            writer.close()

    async def wait_for(self, count: int, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while len(self.received) < count:
                self.arrived.clear()
                await self.arrived.wait()


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    parts = dict(item.split("=", 1) for item in headers["gpux-signature"].split(","))
    expected = hmac.new(secret.encode(), f"{parts['t']}.".encode() + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, parts["v1"]) and abs(time.time() - int(parts["t"])) < 300


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
    assert bodies[2]["data"]["status"] == "ending" and bodies[2]["channel"] == "stream"
    # The figure in the README (run with -s): the notice may reach the receiver before the reclaim's
    # answer reaches its caller (both follow the same commit).
    arrived_at = receiver.received[2][2]
    print(f"reclaim sent -> notice at the receiver: {(arrived_at - sent_at) * 1000:.1f} ms"
          f" (reclaim answered after {(answered_at - sent_at) * 1000:.1f} ms)")
    log = (await tenant.ok("GET", f"/v1/webhooks/{hook['id']}/deliveries"))["items"]
    assert [(d["kind"], d["seq"], d["attempts"], d["last_status_code"]) for d in log] == [
        ("notice", 3, 1, 200), ("lease_started", 2, 1, 200), ("fill", 1, 1, 200)]
    assert all(d["delivered_at"] and d["next_attempt_at"] is None for d in log)


async def test_a_failing_then_down_receiver_gets_the_event_later(admin: Api) -> None:
    receiver = Receiver()
    receiver.answer = 500
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
    hook = await tenant.ok("POST", "/v1/webhooks", 201, json={"url": "https://example.com/h", "events": ["fill"]})
    listed = (await tenant.ok("GET", "/v1/webhooks"))["items"]
    assert [h["id"] for h in listed] == [hook["id"]] and "secret" not in listed[0]
    assert (await other.ok("GET", "/v1/webhooks"))["items"] == []
    for method, path in (("DELETE", f"/v1/webhooks/{hook['id']}"), ("GET", f"/v1/webhooks/{hook['id']}/deliveries"),
                         ("POST", f"/v1/webhooks/{hook['id']}/test")):
        response = await other.request(method, path)
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"
    for body in ({"url": "ftp://example.com/h", "events": ["fill"]}, {"url": "http://", "events": ["fill"]},
                 {"url": "https://example.com/h\n", "events": ["fill"]}, {"url": "https://x:99999/", "events": ["fill"]},
                 # A bracketed host that is no IPv6 address (urlsplit raises; was a 500):
                 {"url": "http://*5[h", "events": ["fill"]}, {"url": "https://[zz]/h", "events": ["fill"]},
                 {"url": "https://example.com/" + "a" * 3000, "events": ["fill"]},
                 {"url": "https://example.com/h", "events": []}, {"url": "https://example.com/h", "events": ["bogus"]},
                 {"url": "https://example.com/h"}):
        response = await tenant.request("POST", "/v1/webhooks", json=body)
        assert 400 <= response.status_code < 500 and "error" in response.json(), (body, response.text)
    response = await tenant.request("GET", "/v1/webhooks/99999999999999999999/deliveries")
    assert 400 <= response.status_code < 500
    admin_try = await admin.request("POST", "/v1/webhooks", json={"url": "https://example.com/h", "events": ["fill"]})
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
