"""The agent loop against a small fake exchange speaking real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import random
import time
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from agents.probe import SimulatedProbe
from agents.runner import (
    AgentConfig,
    Backoff,
    ExchangeClient,
    ExchangeUnavailable,
    LeaseBook,
    default_data_dir,
    host_key,
    run_agent,
)
from agents.wire import format_rfc3339, parse_rfc3339
from exchange.metering.schemas import MeterReport, MeterSample
from tests.unit.exchange_answers import (error_json, host_json, identity_json, offer_json, owner_lease,
                                         owner_lease_json)

TOKEN = "agent-token-1"
FAST = AgentConfig(lease_poll_s=0.05, offer_check_s=0.05, backoff_initial_s=0.02, backoff_max_s=0.1,
                   request_timeout_s=2.0, shutdown_flush_s=2.0)


class FakeExchange:
    """The agent endpoints of the exchange, in memory, over minimal HTTP/1.1 with keep-alive,
    answering in the exchange's own shapes (the agent reads them with the exchange's structs)."""

    def __init__(self) -> None:
        self.port = 0
        self.meter: dict[int, list[dict[str, Any]]] = {}  # stored reports by seq
        self.meter_posts: list[int] = []  # every seq posted, in arrival order
        self.inventory: dict[str, Any] | None = None
        self.offers: list[dict[str, Any]] = []  # as the exchange answers them
        self.offer_bodies: list[dict[str, Any]] = []  # as the agent posted them
        self.leases: list[dict[str, Any]] = []
        self.lease_queries: list[str | None] = []
        self.failing = False  # answer 503 to everything
        self.lose_next_meter_answer = False  # store the next report, then drop the connection
        self.duplicate_answer = "200"  # or "409": how a repeated seq is answered
        self.reject_seqs: set[int] = set()  # answered 422, as a report for a GPU not this host's
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Go away entirely: connections refused until :meth:`start`."""
        assert self._server is not None
        self._server.close()
        for writer in list(self._connections):
            writer.close()
        await self._server.wait_closed()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        self._connections.add(writer)
        try:
            while request_line := await reader.readline():
                method, target, _ = request_line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, value = line.decode().split(":", 1)
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                answer = self._route(method, target, headers, json.loads(body) if body else None)
                if answer is None:
                    break  # lose the answer
                status, payload = answer
                data = b"" if payload is None else json.dumps(payload).encode()
                writer.write(f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass
            self._handlers.discard(task)

    def _route(self, method: str, target: str, headers: dict[str, str], body: Any) -> tuple[int, Any] | None:
        url = urlsplit(target)
        path, query = url.path, {key: values[0] for key, values in parse_qs(url.query).items()}
        if headers.get("authorization") != f"Bearer {TOKEN}":
            return 401, error_json("unauthorized", "unknown key")
        if self.failing:
            return 503, error_json("unavailable", "down for maintenance")
        match method, path:
            case "GET", "/v1/agent/me":
                return 200, {**identity_json(), "extra": "ignored"}  # a newer server's field
            case "PUT", "/v1/agent/inventory":
                self.inventory = body
                return 200, host_json(body["gpus"])
            case "GET", "/v1/agent/offers":
                live = [o for o in self.offers if parse_rfc3339(o["available_until"]) > time.time()]
                return 200, {"items": live}
            case "POST", "/v1/offers" | "/v1/offers/":
                start = parse_rfc3339(body["available_from"]) if body.get("available_from") else time.time()
                end = parse_rfc3339(body["available_until"])
                for offer in self.offers:
                    if start < parse_rfc3339(offer["available_until"]) and parse_rfc3339(offer["available_from"]) < end:
                        return 409, error_json("overlapping_offer", "an offer of this host overlaps")
                offer = offer_json(len(self.offers) + 1, body, body.get("available_from") or format_rfc3339(start))
                self.offers.append(offer)
                self.offer_bodies.append(body)
                return 201, offer
            case "GET", "/v1/agent/leases":
                # Newest first, one lease a page: the agent must follow the cursor.
                matching = [lease for lease in sorted(self.leases, key=lambda lease: -lease["id"])
                            if query.get("status") in (None, lease["status"])
                            and lease["id"] < int(query.get("cursor", 2**62))]
                self.lease_queries.append(query.get("status"))
                page = matching[:1]
                return 200, {"items": page, "next": str(page[0]["id"]) if len(matching) > 1 else None}
            case "POST", "/v1/agent/meter":
                seq = body["seq"]
                self.meter_posts.append(seq)
                if seq in self.reject_seqs:
                    return 422, error_json("invalid_field", "unknown GPU")
                if seq in self.meter:
                    if self.duplicate_answer == "409":
                        return 409, error_json("replayed_sequence", "received already", expected_seq=max(self.meter) + 1)
                    return 200, {"seq": seq, "accepted": 0, "duplicate": True}
                self.meter[seq] = body["samples"]
                if self.lose_next_meter_answer:
                    self.lose_next_meter_answer = False
                    return None
                return 202, {"seq": seq, "accepted": len(body["samples"]), "duplicate": False}
        return 404, error_json("not_found", f"no route {method} {path}")


async def eventually(predicate: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@pytest.fixture
async def exchange():  # noqa: ANN201
    fake = FakeExchange()
    await fake.start()
    yield fake
    if fake._server is not None:
        await fake.stop()


def start_agent(exchange: FakeExchange, data_dir: Path, stop: asyncio.Event, *, policy: Path | None = None,
                simulate: str = "2xH100-80GB", config: AgentConfig = FAST) -> asyncio.Task[None]:
    return asyncio.create_task(run_agent(
        exchange.url, TOKEN, simulate=simulate, policy_path=policy, data_dir=data_dir,
        sample_interval_s=0.01, batch_s=0.05, stop_event=stop, host="h1", seed=1, config=config,
        handle_signals=False))


async def stop_agent(task: asyncio.Task[None], stop: asyncio.Event) -> None:
    stop.set()
    await asyncio.wait_for(task, 10)


def assert_meter_complete(exchange: FakeExchange, gpus: int) -> None:
    """Every sequence from 1 up, once; per GPU, timestamps strictly rising, energy never falling."""
    seqs = sorted(exchange.meter)
    assert seqs == list(range(1, len(seqs) + 1))
    per_gpu: dict[str, list[dict[str, Any]]] = {}
    for seq in seqs:
        for sample in exchange.meter[seq]:
            per_gpu.setdefault(sample["uuid"], []).append(sample)
    assert len(per_gpu) == gpus
    for samples in per_gpu.values():
        times = [parse_rfc3339(s["ts"]) for s in samples]
        assert all(b > a for a, b in zip(times, times[1:], strict=False))
        energy = [s["energy_mj"] for s in samples]
        assert all(b >= a for a, b in zip(energy, energy[1:], strict=False))


# ---------------------------------------------------------------------------------------------
# End to end against the fake exchange


async def test_agent_registers_and_meters_in_sequence(exchange: FakeExchange, tmp_path: Path) -> None:
    stop = asyncio.Event()
    task = start_agent(exchange, tmp_path, stop)

    await eventually(lambda: len(exchange.meter) >= 5, what="meter reports")
    await stop_agent(task, stop)

    assert exchange.inventory is not None
    expected = [{"uuid": g.uuid, "model": "H100-80GB", "memory_mb": 81559, "index": g.index,
                 "name": "NVIDIA H100 80GB HBM3", "power_limit_mw": 700_000, "mig": False}
                for g in SimulatedProbe("2xH100-80GB", seed=1, host="h1").inventory()]
    assert exchange.inventory == {"gpus": expected}
    assert_meter_complete(exchange, gpus=2)
    assert all(len(samples) % 2 == 0 for samples in exchange.meter.values())
    assert exchange.offers == []  # no policy, no offers
    assert not list((tmp_path / "spool" / "reports").iterdir())  # all delivered on the way out


async def test_an_outage_spools_reports_and_delivers_them_in_order_after(exchange: FakeExchange,
                                                                        tmp_path: Path) -> None:
    stop = asyncio.Event()
    task = start_agent(exchange, tmp_path, stop)
    reports_dir = tmp_path / "spool" / "reports"
    await eventually(lambda: len(exchange.meter) >= 3, what="first reports")

    await exchange.stop()  # connection refused
    await eventually(lambda: len(list(reports_dir.iterdir())) >= 5, what="reports spooled during the outage")
    await exchange.start()
    exchange.lose_next_meter_answer = True  # stored, but the agent never hears so: it must resend
    await eventually(lambda: not exchange.lose_next_meter_answer and len(exchange.meter) >= 12, what="recovery")
    exchange.failing = True  # 503s
    await asyncio.sleep(0.2)
    exchange.failing = False
    before_stop = len(exchange.meter)
    await eventually(lambda: len(exchange.meter) >= before_stop + 3, what="more reports")
    await stop_agent(task, stop)

    assert_meter_complete(exchange, gpus=2)
    assert len(exchange.meter_posts) > len(set(exchange.meter_posts))  # the lost answer was resent...
    assert not list(reports_dir.iterdir())  # ...and acked as a duplicate


async def test_a_restarted_agent_continues_its_sequence_with_the_same_gpus(exchange: FakeExchange,
                                                                          tmp_path: Path) -> None:
    stop = asyncio.Event()
    task = start_agent(exchange, tmp_path, stop)
    await eventually(lambda: len(exchange.meter) >= 3, what="reports")
    await stop_agent(task, stop)
    first_run = max(exchange.meter)
    first_inventory = exchange.inventory

    stop = asyncio.Event()
    task = start_agent(exchange, tmp_path, stop)
    await eventually(lambda: max(exchange.meter) >= first_run + 3, what="reports after restart")
    await stop_agent(task, stop)

    assert exchange.inventory == first_inventory
    assert_meter_complete(exchange, gpus=2)  # new sequences, samples later than the first run's


async def test_a_409_with_expected_seq_acks_and_moves_the_sequence_on(exchange: FakeExchange,
                                                                      tmp_path: Path) -> None:
    # The exchange already holds sequences 1..50 (the agent's data dir was lost).
    exchange.meter = {seq: [] for seq in range(1, 51)}
    exchange.duplicate_answer = "409"
    stop = asyncio.Event()
    task = start_agent(exchange, tmp_path, stop)

    await eventually(lambda: max(exchange.meter) >= 53, what="reports past the exchange's sequence")
    await stop_agent(task, stop)

    assert sorted(exchange.meter) == list(range(1, max(exchange.meter) + 1))
    assert not list((tmp_path / "spool" / "reports").iterdir())


async def test_a_report_the_exchange_rejects_is_dropped_without_blocking_the_rest(exchange: FakeExchange,
                                                                                 tmp_path: Path) -> None:
    exchange.reject_seqs = {2}
    stop = asyncio.Event()
    task = start_agent(exchange, tmp_path, stop)

    await eventually(lambda: len(exchange.meter) >= 4, what="reports after the rejected one")
    await stop_agent(task, stop)

    assert 2 not in exchange.meter and exchange.meter_posts.count(2) == 1
    assert sorted(exchange.meter)[:3] == [1, 3, 4]
    assert not list((tmp_path / "spool" / "reports").iterdir())


async def test_leases_run_hooks_once_and_drive_the_simulated_load(exchange: FakeExchange, tmp_path: Path) -> None:
    hook_log = tmp_path / "hooks.log"
    policy = tmp_path / "policy.toml"
    policy.write_text(f'floor_price = "1.80"\n'
                      f'on_lease_start = "echo start $GPUX_LEASE_ID $CUDA_VISIBLE_DEVICES >> {hook_log}"\n'
                      f'on_lease_end = "echo end $GPUX_LEASE_ID $GPUX_GPU_UUIDS >> {hook_log}"\n')
    data_dir = tmp_path / "agent"
    stop = asyncio.Event()
    task = start_agent(exchange, data_dir, stop, policy=policy, simulate="3xH100-80GB")
    await eventually(lambda: exchange.inventory is not None, what="inventory")
    gpu_a, gpu_b, free = (gpu["uuid"] for gpu in exchange.inventory["gpus"])  # type: ignore[index]

    def hooks_run() -> list[str]:
        return sorted(hook_log.read_text().splitlines()) if hook_log.exists() else []

    def latest_power() -> dict[str, int]:
        latest = exchange.meter[max(exchange.meter)] if exchange.meter else []
        return {s["uuid"]: s["power_mw"] for s in latest}

    # Two live leases on two pages of the listing, and an old one that ended long ago.
    exchange.leases = [owner_lease_json(7, "active", [gpu_a]), owner_lease_json(5, "ending", [gpu_b]),
                       owner_lease_json(2, "ended", [free])]
    await eventually(lambda: len(hooks_run()) == 2, what="start hooks")
    assert hooks_run() == [f"start 5 {gpu_b}", f"start 7 {gpu_a}"]
    await eventually(lambda: min(latest_power().get(gpu_a, 0), latest_power().get(gpu_b, 0)) > 300_000,
                     what="the leased cards drawing power")
    assert latest_power()[free] < 90_000
    assert set(exchange.lease_queries) == {"active", "ending"}  # live leases only, not the history

    exchange.leases[0]["status"] = "ending"
    await asyncio.sleep(0.15)
    exchange.leases[0]["status"] = "ended"
    exchange.leases[1]["status"] = "failed"
    await eventually(lambda: len(hooks_run()) == 4, what="end hooks")
    await stop_agent(task, stop)
    expected = [f"end 5 {gpu_b}", f"end 7 {gpu_a}", f"start 5 {gpu_b}", f"start 7 {gpu_a}"]
    assert hooks_run() == expected

    # A restart remembers what ran; a lease that came and went while the agent was away runs nothing.
    exchange.leases.append(owner_lease_json(8, "ended", [free]))
    stop = asyncio.Event()
    task = start_agent(exchange, data_dir, stop, policy=policy, simulate="3xH100-80GB")
    await asyncio.sleep(0.4)
    await stop_agent(task, stop)
    assert hooks_run() == expected


async def test_the_agent_keeps_one_offer_live_and_renews_it_back_to_back(exchange: FakeExchange,
                                                                        tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('floor_price = "2.50"\nfirm_window_s = 60\nreclaim_notice_s = 300\n'
                      'reclaim_rate_per_h = 0.25\noffer_horizon_s = 2\noffer_renew_before_s = 1\n')
    stop = asyncio.Event()
    task = start_agent(exchange, tmp_path / "agent", stop, policy=policy)

    await eventually(lambda: len(exchange.offers) >= 3, what="renewed offers")
    await stop_agent(task, stop)

    first, second = exchange.offer_bodies[0], exchange.offer_bodies[1]
    assert {k: first[k] for k in ("host_id", "gpus", "floor_price", "reclaim_notice_s", "reclaim_rate_per_h")} == {
        "host_id": 1, "gpus": 2, "floor_price": "2.50", "reclaim_notice_s": 300, "reclaim_rate_per_h": 0.25}
    assert first["available_from"] is None and first["model"] == "H100-80GB"
    assert second["available_from"] == first["available_until"]
    assert parse_rfc3339(first["firm_until"]) == pytest.approx(time.time() + 60, abs=5)


async def test_a_policy_naming_a_missing_gpu_fails_at_start(exchange: FakeExchange, tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text('floor_price = "1"\ngpus = [9]\n')

    with pytest.raises(ValueError, match="gpus: this host has no GPU 9"):
        await start_agent(exchange, tmp_path / "agent", asyncio.Event(), policy=policy)


async def test_two_agents_cannot_share_a_data_dir(exchange: FakeExchange, tmp_path: Path) -> None:
    stop = asyncio.Event()
    task = start_agent(exchange, tmp_path, stop)
    await eventually(lambda: len(exchange.meter) >= 1, what="first agent running")

    with pytest.raises(RuntimeError, match="another agent"):
        await start_agent(exchange, tmp_path, asyncio.Event())
    await stop_agent(task, stop)


# ---------------------------------------------------------------------------------------------
# Client and pieces


async def test_client_maps_unreachable_and_failing_exchanges_to_unavailable(exchange: FakeExchange) -> None:
    report = MeterReport(seq=1, samples=[MeterSample(uuid="GPU-aaaaaaaa", ts=datetime(2025, 1, 1, tzinfo=UTC), util=1,
                                                     mem_used_mb=1, power_mw=1, energy_mj=1, temp_c=1, healthy=True)])
    client = ExchangeClient(exchange.url, TOKEN, timeout_s=2)
    try:
        assert (await client.send_meter(report)).outcome == "accepted"
        assert (await client.send_meter(report)).outcome == "duplicate"
        exchange.failing = True
        with pytest.raises(ExchangeUnavailable, match="503"):
            await client.send_meter(report)
        exchange.failing = False
        await exchange.stop()
        with pytest.raises(ExchangeUnavailable, match="ConnectError"):
            await client.me()
    finally:
        await client.aclose()
    bad = ExchangeClient(f"http://127.0.0.1:{exchange.port}", "wrong", timeout_s=2)
    await exchange.start()
    try:
        with pytest.raises(ExchangeUnavailable, match="401"):
            await bad.me()
    finally:
        await bad.aclose()


def test_lease_book_plans_hooks_and_busy_gpus(tmp_path: Path) -> None:
    book = LeaseBook(tmp_path / "state.json")
    leases = [owner_lease("a", "active", ["g1"]), owner_lease("b", "ending", ["g2"]),  # type: ignore[arg-type]
              owner_lease("c", "ended", ["g3"]), owner_lease("d", "pending", ["g4"])]  # type: ignore[arg-type]

    actions, busy = book.plan(leases)

    assert [(a.event, a.lease_id) for a in actions] == [("lease_start", "a"), ("lease_start", "b")]
    assert busy == {"g1", "g2"}
    assert book.phase_of("c") == "ended" and book.phase_of("d") is None

    for action in actions:
        book.record(action)
    restarted = LeaseBook(tmp_path / "state.json")
    actions, busy = restarted.plan([owner_lease("a", "failed", ["g1"])])  # type: ignore[arg-type]

    assert [(a.event, a.lease_id, a.gpu_uuids) for a in actions] == [("lease_end", "a", ["g1"]),
                                                                     ("lease_end", "b", [])]
    assert busy == set()


def test_backoff_grows_to_its_cap_with_seeded_jitter() -> None:
    delays = [Backoff(0.5, 4.0, random.Random(1)).next_delay() for _ in range(2)]
    backoff = Backoff(0.5, 4.0, random.Random(1))

    series = [backoff.next_delay() for _ in range(8)]
    backoff.reset()

    assert delays[0] == delays[1] == series[0]
    assert all(0.25 <= d <= 0.5 for d in series[:1]) and all(2.0 <= d <= 4.0 for d in series[4:])
    assert backoff.next_delay() <= 0.5
    assert backoff.next_delay(at_least_s=10) == 10


def test_default_data_dir_and_host_key() -> None:
    assert default_data_dir("h1", {"GPUX_HOME": "/srv/gpux"}) == Path("/srv/gpux/agent-h1")
    assert default_data_dir("a/b", {}) == Path(".gpux/agent-a_b")
    assert host_key("t", "h1") == "h1"
    assert host_key("t1") != host_key("t2") and host_key("t1") == host_key("t1")


async def test_an_injected_transport_carries_every_call() -> None:
    """A transport given to run_agent (passed on to ExchangeClient) reaches the client: the calls go
    where a test routes them, with the agent token and the agent's User-Agent."""
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=identity_json())

    client = ExchangeClient("http://exchange.invalid", TOKEN, timeout_s=2, transport=httpx.MockTransport(answer))
    try:
        identity = await client.me()
    finally:
        await client.aclose()

    assert identity.host_id == 1
    assert [(r.method, r.url.path, r.headers["authorization"], r.headers["user-agent"]) for r in seen] == [
        ("GET", "/v1/agent/me", f"Bearer {TOKEN}", "gpux-agent/1")]
