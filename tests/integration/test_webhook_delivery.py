"""Webhook delivery in-process on real PostgreSQL, with a resolver the test controls and receivers on
loopback: a name is checked again at every attempt and the connection goes to the address checked;
a process that dies between its send and its record leaves a claim that runs out, and the message is
sent again, never lost, never twice while the claim lives."""
from __future__ import annotations

import asyncio
import ipaddress
import shutil
import ssl
import subprocess

import pytest

from exchange.accounts.schemas import AccountCreate
from exchange.accounts.service import create_account
from exchange.core.auth import Principal
from exchange.webhooks import service
from exchange.webhooks.delivery import CLAIM_MARGIN_S, WebhookDeliverer
from exchange.webhooks.destinations import NAME_REFUSED, parse_nets
from exchange.webhooks.resolvers import Destinations
from exchange.webhooks.schemas import WebhookCreate
from exchange.webhooks.signing import signed_headers
from tests.integration.scenario import Scenario
from tests.receivers import Receiver


class Names:
    """name -> addresses, changed by the test as a DNS owner would."""

    def __init__(self, table: dict[str, list[str]] | None = None) -> None:
        self.table = dict(table or {})

    async def __call__(self, host: str, port: int) -> list:
        if host not in self.table:
            raise LookupError(host)
        return [ipaddress.ip_address(a) for a in self.table[host]]


@pytest.fixture
async def s(db_url: str):
    scenario = await Scenario.create(db_url, webhook_retry_min_s=1.0, webhook_timeout_s=2.0,
                                     webhook_disable_after_s=3600.0)
    yield scenario
    await scenario.close()


async def tenant(s: Scenario) -> Principal:
    account = await create_account(s.ctx, AccountCreate(name="tenant", role="tenant"))
    return Principal(role="tenant", account_id=account.id)


async def pinged_webhook(s: Scenario, receiver: Receiver) -> tuple[Destinations, Principal, object]:
    """A tenant's webhook at a loopback receiver (allowed), with a ping queued."""
    s.ctx.extras["webhook_destinations"] = destinations = Destinations(Names(), parse_nets("127.0.0.0/8"))
    principal = await tenant(s)
    hook = await service.create_webhook(s.ctx, principal, WebhookCreate(url=receiver.url, events=["fill"]))
    await service.queue_ping(s.ctx, principal, hook.id)
    return destinations, principal, hook


async def ping_once(s: Scenario, destinations: Destinations, url: str) -> tuple[Principal, object]:
    """A tenant's webhook at `url`, one ping queued and attempted until nothing is due."""
    s.ctx.extras["webhook_destinations"] = destinations
    principal = await tenant(s)
    hook = await service.create_webhook(s.ctx, principal, WebhookCreate(url=url, events=["fill"]))
    await service.queue_ping(s.ctx, principal, hook.id)
    deliverer = WebhookDeliverer(s.ctx, destinations)
    await deliverer.drain()
    await deliverer.stop()
    return principal, hook


async def log_of(s: Scenario, principal: Principal, webhook_id: int) -> list:
    return await service.list_deliveries(s.ctx, principal, webhook_id)


async def test_a_name_repointed_after_create_is_refused_at_send(s: Scenario) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        names = Names({"hooks.tenant.test": ["93.184.216.34"]})  # public at create (nothing connects at create)
        s.ctx.extras["webhook_destinations"] = destinations = Destinations(names)
        principal = await tenant(s)
        hook = await service.create_webhook(s.ctx, principal, WebhookCreate(
            url=f"http://hooks.tenant.test:{receiver.port}/h", events=["fill"]))
        names.table["hooks.tenant.test"] = ["127.0.0.1"]  # re-pointed at the exchange's own machine
        await service.queue_ping(s.ctx, principal, hook.id)
        deliverer = WebhookDeliverer(s.ctx, destinations)
        await deliverer.drain()
        await deliverer.stop()
    finally:
        await receiver.stop()
    assert receiver.seen == []
    [delivery] = await log_of(s, principal, hook.id)
    assert delivery.attempts == 1 and delivery.delivered_at is None and delivery.last_status_code is None
    assert delivery.last_error == f"refused: {NAME_REFUSED}"


async def test_each_attempt_connects_to_the_address_it_checked_with_the_original_host(s: Scenario) -> None:
    first, second = Receiver("127.0.0.1"), Receiver("127.0.0.2")
    second.port = first.port  # one URL, two machines behind the name
    await first.start()
    await second.start()
    try:
        names = Names({"hooks.tenant.test": ["127.0.0.1"]})
        s.ctx.extras["webhook_destinations"] = destinations = Destinations(names, parse_nets("127.0.0.0/8"))
        principal = await tenant(s)
        hook = await service.create_webhook(s.ctx, principal, WebhookCreate(
            url=f"http://hooks.tenant.test:{first.port}/h?k=1", events=["fill"]))
        deliverer = WebhookDeliverer(s.ctx, destinations)
        await service.queue_ping(s.ctx, principal, hook.id)
        await deliverer.drain()
        names.table["hooks.tenant.test"] = ["127.0.0.2"]
        await service.queue_ping(s.ctx, principal, hook.id)
        await deliverer.drain()
        names.table["hooks.tenant.test"] = ["127.0.0.2", "10.0.0.9"]  # one address inside: refused
        await service.queue_ping(s.ctx, principal, hook.id)
        await deliverer.drain()
        await deliverer.stop()
    finally:
        await first.stop()
        await second.stop()
    assert len(first.received) == 1 and len(second.received) == 1
    assert first.received[0][0]["host"] == second.received[0][0]["host"] == f"hooks.tenant.test:{first.port}"
    log = await log_of(s, principal, hook.id)
    assert [d.delivered_at is not None for d in log] == [False, True, True]
    assert log[0].last_error == f"refused: {NAME_REFUSED}"


async def test_a_crash_between_send_and_record_sends_again_once_the_claim_runs_out(s: Scenario) -> None:
    receiver = Receiver()
    await receiver.start()
    try:
        destinations, principal, hook = await pinged_webhook(s, receiver)
        dying, other = WebhookDeliverer(s.ctx, destinations), WebhookDeliverer(s.ctx, destinations)
        job = await dying._claim(hook.id)
        headers = signed_headers(job.secret, job.delivery_id, int(s.clock().timestamp()), job.body)
        assert (await dying.sender.send(job.url, job.body, headers)).error is None
        # ... and the process dies here, before recording. While its claim lives nobody else sends.
        await other.drain()
        assert len(receiver.received) == 1
        s.clock.advance(s.ctx.settings.webhook_timeout_s + CLAIM_MARGIN_S + 1)
        await other.drain()
        assert len(receiver.received) == 2
        # The dead process's late record finds its claim gone and writes nothing.
        assert await dying._record(job, (await dying.sender.send(job.url, job.body, headers))) is False
        await dying.stop()
        await other.stop()
    finally:
        await receiver.stop()
    ids = {headers["webhook-id"] for headers, _, _ in receiver.received}
    assert ids == {f"msg_{job.delivery_id}"}  # the same message: the receiver dedupes it
    [delivery] = await log_of(s, principal, hook.id)
    assert delivery.delivered_at is not None and delivery.attempts == 1


async def test_a_webhook_failing_past_the_limit_is_disabled_and_keeps_its_events(s: Scenario) -> None:
    receiver = Receiver(answer=503)
    await receiver.start()
    try:
        destinations, principal, hook = await pinged_webhook(s, receiver)
        deliverer = WebhookDeliverer(s.ctx, destinations)
        limit_s = s.ctx.settings.webhook_disable_after_s
        elapsed = 0.0
        while elapsed < limit_s + 600:
            await deliverer.drain()
            s.clock.advance(300)
            elapsed += 300
            [listed] = await service.list_webhooks(s.ctx, principal)
            if listed.status == "disabled":
                break
        assert listed.status == "disabled" and limit_s <= (listed.disabled_at - listed.failing_since).total_seconds()
        tries = receiver.refused
        s.clock.advance(3600)
        await deliverer.drain()
        assert receiver.refused == tries  # disabled: not tried
        receiver.answer = 200
        enabled = await service.enable_webhook(s.ctx, principal, hook.id)
        assert enabled.status == "active" and enabled.failing_since is None
        await deliverer.drain()
        await deliverer.stop()
    finally:
        await receiver.stop()
    assert len(receiver.received) == 1
    [delivery] = await log_of(s, principal, hook.id)
    assert delivery.delivered_at is not None and delivery.attempts == tries + 1


async def test_https_goes_to_the_checked_address_with_the_url_s_name_as_tls_server_name(s: Scenario, tmp_path) -> None:
    """A TLS listener on loopback records the server name each client hello asks for: the attempt
    connects to the address checked yet names the URL's host, so certificates are checked against it
    (this one is self-signed: the attempt fails verification, after the hello)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=hooks.tenant.test"], check=True, capture_output=True)
    names_asked: list[str | None] = []
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.sni_callback = lambda _sock, name, _ctx: names_asked.append(name)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        principal, hook = await ping_once(s, Destinations(Names({"hooks.tenant.test": ["127.0.0.1"]}),
                                                          parse_nets("127.0.0.0/8")), f"https://hooks.tenant.test:{port}/h")
    finally:
        server.close()
    assert names_asked == ["hooks.tenant.test"]
    [delivery] = await log_of(s, principal, hook.id)
    assert delivery.delivered_at is None and "CERTIFICATE_VERIFY_FAILED" in delivery.last_error


async def test_a_message_backing_off_holds_its_webhook_out_of_the_next_passes(s: Scenario) -> None:
    """Events queued behind a message that waits for its retry are no work yet: a pass must not
    start a worker for them (each worker's end starts the next pass: that was a busy loop)."""
    receiver = Receiver(answer=503)
    await receiver.start()
    try:
        destinations, principal, hook = await pinged_webhook(s, receiver)
        deliverer = WebhookDeliverer(s.ctx, destinations)
        await deliverer.drain()  # the ping failed: it backs off
        assert receiver.refused == 1
        # A new event of the account, after the webhook's cursor, waits behind the ping.
        await s.ctx.pool.execute("UPDATE accounts SET event_seq = event_seq + 1 WHERE id = $1", principal.account_id)
        await deliverer.run_once()
        assert deliverer.workers == {}
        s.clock.advance(s.ctx.settings.webhook_retry_min_s)  # the retry is due: work again
        await deliverer.run_once()
        assert list(deliverer.workers) == [hook.id]
        await deliverer.drain()
        await deliverer.stop()
    finally:
        await receiver.stop()
    assert receiver.refused == 2


async def test_a_redirect_is_not_followed(s: Scenario) -> None:
    """A receiver answering 302 towards another address gets its answer logged as a failure; the
    address it points to never hears of the message (a redirect would skip the destination check)."""
    target = Receiver()
    await target.start()

    async def redirect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(f"HTTP/1.1 302 Found\r\nLocation: {target.url}\r\nContent-Length: 0\r\n\r\n".encode())
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(redirect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        principal, hook = await ping_once(s, Destinations(Names(), parse_nets("127.0.0.0/8")),
                                          f"http://127.0.0.1:{port}/h")
    finally:
        server.close()
        await target.stop()
    assert target.seen == []
    [delivery] = await log_of(s, principal, hook.id)
    assert delivery.last_status_code == 302 and delivery.last_error == "HTTP 302" and delivery.delivered_at is None
