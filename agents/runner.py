"""The host agent: registers the host's GPUs, keeps an offer live, follows leases, meters.

Five cooperating tasks share one :class:`Agent`:

- *sampler*: reads the probe every ``sample_interval_s`` and appends a batch to the durable spool
  every ``batch_s`` (metering never waits for the network);
- *sender*: sends spooled reports in sequence order, acks what the exchange has, and backs off
  (seeded jitter) while the exchange is unreachable or failing;
- *control*: learns the host's identity, puts the inventory, keeps one live offer per the
  owner's policy and renews it before ``available_until`` runs out;
- *leases*: polls the host's leases, marks their GPUs busy on the probe, queues hooks;
- *hooks*: runs ``on_lease_start`` / ``on_lease_end`` one at a time, in the order queued, and
  records each in the agent's state file once it has run (at least once: a hook interrupted by a
  crash runs again on restart, so hooks should be idempotent).

Exchange contract relied on (Bearer = the host's agent token), see :class:`ExchangeClient`.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import random
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Literal, TypeVar

import msgspec

from agents.hooks import HookEvent, run_hook
from agents.metrics import AgentCounters, MetricsServer, render_metrics
from agents.notices import NoticeBoard, serve_metadata
from agents.policy import Policy, PolicyError, load_policy, select_gpus
from agents.probe import Clock, GpuInfo, GpuProbe, GpuSample, make_probe
from agents.spool import MeterSpool, write_file_durably
from agents.wire import as_sent, epoch_s, utc
from exchange.client import ApiError, AsyncClient, Conflict, ConnectionFailed, NotFound
from exchange.client.aio import TRANSIENT_STATUSES, Transport
from exchange.hosts.schemas import AgentIdentity, Inventory, InventoryGpu
from exchange.leases.schemas import LeaseStatus, OwnerLease
from exchange.metering.schemas import MeterReport, MeterSample
from exchange.offers.schemas import Offer, OfferCreate

__all__ = [
    "Agent",
    "AgentConfig",
    "AgentState",
    "Backoff",
    "ExchangeClient",
    "ExchangeRefused",
    "ExchangeUnavailable",
    "UnreadableAnswer",
    "HookAction",
    "LeaseBook",
    "MeterDelivery",
    "default_data_dir",
    "host_key",
    "inventory_report",
    "meter_sample",
    "run_agent",
]

log = logging.getLogger("gpux.agent")

_T = TypeVar("_T")


class AgentConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    sample_interval_s: float = 1.0
    batch_s: float = 5.0
    lease_poll_s: float = 2.0
    offer_check_s: float = 30.0
    inventory_refresh_s: float = 600.0
    request_timeout_s: float = 10.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    shutdown_flush_s: float = 3.0  # how long a clean shutdown tries to deliver what is spooled
    shutdown_hook_grace_s: float = 10.0  # how long a clean shutdown lets a running hook finish
    spool_max_reports: int = 17_280
    spool_max_bytes: int = 256 * 1024 * 1024

    def __post_init__(self) -> None:
        for name in ("sample_interval_s", "batch_s", "lease_poll_s", "offer_check_s",
                     "inventory_refresh_s", "request_timeout_s", "backoff_initial_s", "backoff_max_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")

    @property
    def samples_per_batch(self) -> int:
        return max(1, round(self.batch_s / self.sample_interval_s))


# ---------------------------------------------------------------------------------------------
# Exchange client


class ExchangeUnavailable(Exception):
    """Could not reach the exchange, or it failed (5xx, 429, auth): try again later."""

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ExchangeRefused(Exception):
    """The exchange understood and said no (4xx), or answered in a shape we cannot read."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class UnreadableAnswer(ExchangeRefused):
    """A success answer in a shape the agent cannot read (a server of another protocol version):
    not a refusal of the request, so what it concerned (a meter report) is kept and tried again."""


class MeterDelivery(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What became of one meter report; the spool may drop everything up to ``ack_through``."""

    outcome: Literal["accepted", "duplicate", "rejected"]
    ack_through: int
    detail: str = ""


# Answers that say "not now" rather than "no": the report or request is kept and retried. 401/403
# are here too: a token being rotated must not make the agent throw away metering data; 404 is a
# route missing on a server mid-upgrade. Every 5xx counts as "not now" as well.
_NOT_NOW_STATUSES = frozenset({401, 403, 404, 408, 425, 429})

# A listing that never ends is a server bug, not a reason to loop forever (the old bound: 1000
# pages, here counted in leases since the client follows the cursor itself).
_MAX_LISTED_LEASES = 500_000


@contextlib.contextmanager
def _as_agent_outcome(what: str) -> Iterator[None]:
    """The client's exceptions as the agent's two: try later (kept) or refused."""
    try:
        yield
    except ConnectionFailed as error:
        raise ExchangeUnavailable(f"{what}: {error}") from error
    except ApiError as error:
        detail = f"{what}: HTTP {error.status} {error.code}: {error.message}"
        if error.status >= 500 or error.status in _NOT_NOW_STATUSES:
            raise ExchangeUnavailable(detail, retry_after_s=error.retry_after_s) from error
        raise ExchangeRefused(error.status, detail) from error
    except msgspec.DecodeError as error:  # ValidationError included: an answer of another shape
        raise UnreadableAnswer(200, f"{what}: unexpected answer ({error})") from None


class ExchangeClient:
    """The exchange's agent API as the agent needs it: the Python client's calls (one definition
    of the protocol), their failures sorted into "try later" and "refused", and a meter answer
    turned into what the spool may forget. ``transport`` lets tests route it anywhere.

    The client itself resends a repeatable call (the reads, the inventory, a meter report: its seq
    makes a resend harmless) on a connection error or a "not now" status, honouring a short
    Retry-After; what is still failing after that comes here, and the agent's loops back off."""

    def __init__(self, base_url: str, token: str, *, timeout_s: float = 10.0,
                 transport: Transport | None = None) -> None:
        self._api = AsyncClient(base_url, token, timeout_s=timeout_s, transport=transport,
                                retry_statuses=TRANSIENT_STATUSES, user_agent="gpux-agent/1")

    async def aclose(self) -> None:
        await self._api.aclose()

    async def me(self) -> AgentIdentity:
        """``GET /v1/agent/me``."""
        with _as_agent_outcome("GET /v1/agent/me"):
            return await self._api.agent_me()

    async def put_inventory(self, report: Inventory) -> None:
        """``PUT /v1/agent/inventory``."""
        with _as_agent_outcome("PUT /v1/agent/inventory"):
            await self._api.put_inventory(report)

    async def list_offers(self) -> list[Offer]:
        """``GET /v1/agent/offers``: the host's live offers."""
        with _as_agent_outcome("GET /v1/agent/offers"):
            return await self._api.agent_offers()

    async def create_offer(self, offer: OfferCreate) -> Offer:
        """``POST /v1/offers``; 409 (overlap) raises :class:`ExchangeRefused`."""
        with _as_agent_outcome("POST /v1/offers"):
            return await self._api.create_offer(**msgspec.structs.asdict(offer))

    async def delete_offer(self, offer_id: int) -> None:
        """``DELETE /v1/offers/{id}``; an offer already gone (404) is fine."""
        with _as_agent_outcome(f"DELETE /v1/offers/{offer_id}"):
            with contextlib.suppress(NotFound):
                await self._api.withdraw_offer(offer_id)

    async def list_leases(self, status: LeaseStatus | None = None) -> list[OwnerLease]:
        """``GET /v1/agent/leases[?status=S]``, every page followed."""
        leases: list[OwnerLease] = []
        with _as_agent_outcome("GET /v1/agent/leases"):
            async for lease in self._api.agent_leases(status):
                leases.append(lease)
                if len(leases) > _MAX_LISTED_LEASES:
                    raise UnreadableAnswer(200, f"more than {_MAX_LISTED_LEASES} leases listed")
        return leases

    async def send_meter(self, report: MeterReport) -> MeterDelivery:
        """``POST /v1/agent/meter``.

        200/202: delivered (``duplicate`` when the exchange had it). 409 with ``expected_seq`` k:
        the exchange already has this sequence (and, when k is higher, everything below k).
        400/413/422: the exchange will never take this report; it is dropped (logged) so that it
        cannot block the ones behind it. Anything retryable raises :class:`ExchangeUnavailable`.
        """
        try:
            with _as_agent_outcome("POST /v1/agent/meter"):
                try:
                    ack = await self._api.meter(report)
                except Conflict as conflict:
                    expected = conflict.extra.get("expected_seq")
                    through = max(report.seq, expected - 1) if isinstance(expected, int) else report.seq
                    return MeterDelivery(outcome="duplicate", ack_through=through, detail=str(conflict))
        except UnreadableAnswer:
            raise  # keep the report, try again
        except ExchangeRefused as refused:
            return MeterDelivery(outcome="rejected", ack_through=report.seq, detail=refused.detail)
        # Refused samples are not retried: the exchange will refuse them again; the report is delivered.
        detail = f"{ack.refused} sample(s) refused: {ack.refused_reasons}" if ack.refused else ""
        return MeterDelivery(outcome="duplicate" if ack.duplicate else "accepted", ack_through=report.seq,
                             detail=detail)


# ---------------------------------------------------------------------------------------------
# Pure helpers


def meter_sample(sample: GpuSample) -> MeterSample:
    return MeterSample(uuid=sample.uuid, ts=utc(sample.ts), util=sample.util,
                       mem_used_mb=sample.mem_used_mb, power_mw=sample.power_mw, energy_mj=sample.energy_mj,
                       temp_c=sample.temp_c, healthy=sample.healthy)


def inventory_report(gpus: Iterable[GpuInfo]) -> Inventory:
    return Inventory(gpus=[
        InventoryGpu(uuid=gpu.uuid, model=gpu.model, memory_mb=gpu.memory_mb, index=gpu.index, name=gpu.name,
                     power_limit_mw=gpu.power_limit_mw or None, mig=gpu.mig)
        for gpu in gpus])


def host_key(token: str, host: str | None = None) -> str:
    """What tells this agent's host apart on this machine: the given host name, else the machine's
    name plus a digest of the token (several simulated hosts on one machine each get their own)."""
    if host:
        return host
    return f"{socket.gethostname()}-{hashlib.sha256(token.encode()).hexdigest()[:8]}"


def default_data_dir(key: str, environ: Mapping[str, str] | None = None) -> Path:
    """``$GPUX_HOME/agent-<key>``, with ``GPUX_HOME`` defaulting to ``./.gpux`` (SPEC §9)."""
    env = os.environ if environ is None else environ
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in key)
    return Path(env.get("GPUX_HOME") or ".gpux") / f"agent-{safe}"


class Backoff:
    """Exponential backoff with seeded jitter (half to full of the current step)."""

    def __init__(self, initial_s: float, maximum_s: float, rng: random.Random) -> None:
        self._initial = initial_s
        self._maximum = maximum_s
        self._rng = rng
        self._attempt = 0

    def next_delay(self, at_least_s: float | None = None) -> float:
        step = min(self._maximum, self._initial * 2 ** self._attempt)
        self._attempt = min(self._attempt + 1, 32)
        delay = step * self._rng.uniform(0.5, 1.0)
        return max(delay, at_least_s or 0.0)

    def reset(self) -> None:
        self._attempt = 0


# ---------------------------------------------------------------------------------------------
# Leases and their hooks

LeasePhase = Literal["running", "finished"]

# Exchange lease statuses -> what they mean for this host. A status missing here (one the server
# adds later) is left alone. The order of the running ones is the order a lease passes through
# them (the agent lists them in this order).
LEASE_PHASES: Mapping[str, LeasePhase] = {
    "active": "running",
    "ending": "running",  # under a reclaim/outbid notice: the tenant still has the GPUs
    "ended": "finished",
    "failed": "finished",
}


_LIVE_LEASE_STATUSES = tuple(status for status, phase in LEASE_PHASES.items() if phase == "running")


class HookAction(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    event: HookEvent
    lease_id: str
    gpu_uuids: list[str]


class AgentState(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``agent-state.json``: which hooks have run, per lease id ("started" or "ended")."""

    leases: dict[str, Literal["started", "ended"]] = {}


_json = msgspec.json.Encoder()
_state_decoder = msgspec.json.Decoder(AgentState)


class LeaseBook:
    """Which lease hooks have run, persisted in the data dir so a restart neither repeats nor
    forgets them; and what the latest lease listing asks for."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._leases: dict[str, Literal["started", "ended"]] = dict(self._load().leases)
        self._gpus: dict[str, list[str]] = {}  # lease id -> its GPUs, from the latest listing

    def _load(self) -> AgentState:
        try:
            return _state_decoder.decode(self._path.read_bytes())
        except FileNotFoundError:
            return AgentState()
        except (OSError, msgspec.DecodeError) as error:
            # Worst case: hooks of live leases run again (they are idempotent by contract).
            log.error("agent state %s unreadable (%s); starting afresh", self._path, error)
            return AgentState()

    def save(self) -> None:
        write_file_durably(self._path, _json.encode(AgentState(leases=self._leases)))

    def phase_of(self, lease_id: str) -> str | None:
        return self._leases.get(lease_id)

    def plan(self, leases: Sequence[OwnerLease]) -> tuple[list[HookAction], set[str]]:
        """Hooks to run for this listing, and the GPUs the listing says are leased.

        A lease seen running for the first time gets its start hook; a lease whose start hook ran
        gets its end hook when it is listed finished *or no longer listed at all* (the exchange
        does not count it as live, so its GPUs are free). A lease first seen already finished
        ran while the agent was away: nothing was set up, so no hook runs for it.
        """
        actions: list[HookAction] = []
        busy: set[str] = set()
        listed: set[str] = set()
        changed = False
        for lease in leases:
            lease_id = str(lease.id)
            phase = LEASE_PHASES.get(lease.status)
            if phase is None:
                continue
            listed.add(lease_id)
            self._gpus[lease_id] = list(lease.gpu_uuids)
            recorded = self._leases.get(lease_id)
            if phase == "running":
                busy.update(lease.gpu_uuids)
                if recorded is None:
                    actions.append(HookAction(event="lease_start", lease_id=lease_id, gpu_uuids=list(lease.gpu_uuids)))
            elif recorded == "started":
                actions.append(HookAction(event="lease_end", lease_id=lease_id, gpu_uuids=list(lease.gpu_uuids)))
            elif recorded is None:
                self._leases[lease_id] = "ended"
                changed = True
        for lease_id, recorded in list(self._leases.items()):
            if lease_id in listed:
                continue
            if recorded == "started":
                actions.append(HookAction(event="lease_end", lease_id=lease_id,
                                          gpu_uuids=self._gpus.get(lease_id, [])))
            else:
                del self._leases[lease_id]  # ended and forgotten by the exchange: forget it too
                self._gpus.pop(lease_id, None)
                changed = True
        if changed:
            self.save()
        return actions, busy

    def record(self, action: HookAction) -> None:
        self._leases[action.lease_id] = "started" if action.event == "lease_start" else "ended"
        self.save()


# ---------------------------------------------------------------------------------------------
# The agent


async def _cancel_and_wait(tasks: Sequence[asyncio.Task[None]]) -> None:
    """Cancel until done: a task can swallow one cancellation (third-party code, or a cancel that
    races with completion), and a task left pending at shutdown would be destroyed mid-flight."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)


class Agent:
    """One host's agent; :meth:`run` returns after ``stop_event`` is set (or a task fails)."""

    def __init__(self, *, client: ExchangeClient, probe: GpuProbe, spool: MeterSpool, lease_book: LeaseBook,
                 policy: Policy | None, config: AgentConfig, clock: Clock, stop_event: asyncio.Event,
                 seed: int = 0, notices: NoticeBoard | None = None) -> None:
        self._notices = notices
        self._client = client
        self._probe = probe
        self._spool = spool
        self._lease_book = lease_book
        self._policy = policy
        self._config = config
        self._clock = clock
        self._stop = stop_event
        self._rng = random.Random(seed)
        self._registered = asyncio.Event()
        self._report_ready = asyncio.Event()
        self._hook_queue: asyncio.Queue[HookAction] = asyncio.Queue()
        self._queued: set[tuple[str, str]] = set()
        self._identity: AgentIdentity | None = None
        self._inventory = probe.inventory()
        self.rejected_reports = 0
        # Read by the metrics endpoint (agents/metrics.py); written only here.
        self.latest_samples: list[GpuSample] = []
        self.samples_taken = 0
        self.sent_reports = 0
        self.live_leases = 0

    # -- lifecycle

    async def run(self) -> None:
        tasks = {
            "sampler": asyncio.create_task(self._sample_loop(), name="gpux-agent-sampler"),
            "sender": asyncio.create_task(self._send_loop(), name="gpux-agent-sender"),
            "control": asyncio.create_task(self._control_loop(), name="gpux-agent-control"),
            "leases": asyncio.create_task(self._lease_loop(), name="gpux-agent-leases"),
            "hooks": asyncio.create_task(self._hook_worker(), name="gpux-agent-hooks"),
        }
        stop_waiter = asyncio.create_task(self._stop.wait())
        failure: BaseException | None = None
        try:
            done, _ = await asyncio.wait([stop_waiter, *tasks.values()], return_when=asyncio.FIRST_COMPLETED)
            for name, task in tasks.items():
                if task in done and not task.cancelled() and task.exception() is not None:
                    failure = task.exception()
                    log.error("agent task %s failed; shutting down", name, exc_info=failure)
        finally:
            self._stop.set()
            stop_waiter.cancel()
            # The sampler flushes its partial batch to the spool when it sees the stop.
            await asyncio.gather(tasks["sampler"], return_exceptions=True)
            await _cancel_and_wait([tasks[name] for name in ("control", "leases", "sender")])
            # A hook that is running finishes (within a grace) and is recorded, so that a restart
            # does not run it again; the worker takes no new action once stopping.
            await asyncio.wait([tasks["hooks"]], timeout=self._config.shutdown_hook_grace_s)
            await _cancel_and_wait([tasks["hooks"]])
            await asyncio.gather(stop_waiter, return_exceptions=True)
            await self._final_flush()
        if failure is not None:
            raise failure

    async def _final_flush(self) -> None:
        if not self._registered.is_set() or not len(self._spool):
            return
        try:
            async with asyncio.timeout(self._config.shutdown_flush_s):
                await self._send_pending()
        except (TimeoutError, ExchangeUnavailable, ExchangeRefused) as error:
            log.warning("final meter flush stopped: %s", error or "timed out")
        if len(self._spool):
            log.info("%d meter report(s) stay spooled for the next start", len(self._spool))

    async def _sleep_or_stop(self, seconds: float) -> bool:
        """Sleep, waking early on stop; True when stopping."""
        if self._stop.is_set():
            return True
        # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a racing cancellation.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self._stop.wait()
        return self._stop.is_set()

    async def _retrying(self, what: str, call: Callable[[], Awaitable[_T]]) -> _T | None:
        """``call`` until it succeeds (None if stopped first), backing off on unavailability."""
        backoff = Backoff(self._config.backoff_initial_s, self._config.backoff_max_s, self._rng)
        while not self._stop.is_set():
            try:
                return await call()
            except ExchangeUnavailable as error:
                delay = backoff.next_delay(error.retry_after_s)
                log.warning("%s: exchange unavailable (%s); retrying in %.1fs", what, error, delay)
            except ExchangeRefused as error:
                delay = backoff.next_delay()
                log.error("%s: refused (%s); retrying in %.1fs", what, error, delay)
            await self._sleep_or_stop(delay)
        return None

    # -- sampler

    async def _sample_loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self._config.sample_interval_s
        per_batch = self._config.samples_per_batch
        batch: list[MeterSample] = []
        ticks = 0
        next_tick = loop.time()
        while not self._stop.is_set():
            try:
                samples = self._probe.sample()
                self.latest_samples, self.samples_taken = samples, self.samples_taken + 1
                batch.extend(meter_sample(sample) for sample in samples)
            except Exception:
                log.exception("sampling the GPUs failed")
            ticks += 1
            if ticks >= per_batch:
                self._spool_batch(batch)
                batch, ticks = [], 0
            next_tick += interval
            now = loop.time()
            if next_tick < now:  # fell behind (suspended, overloaded): skip, do not burst
                next_tick = now
            if await self._sleep_or_stop(next_tick - now):
                break
        if batch:
            self._spool_batch(batch)

    def _spool_batch(self, batch: list[MeterSample]) -> None:
        if not batch:
            return
        try:
            # Synchronous on purpose: one small fsync per batch, and the spool stays single-threaded.
            report = self._spool.append(batch)
        except OSError:
            log.exception("could not spool %d meter sample(s); they are lost", len(batch))
            return
        log.debug("spooled meter report %d (%d samples)", report.seq, len(batch))
        self._report_ready.set()

    # -- sender

    async def _send_loop(self) -> None:
        await self._wait_registered()
        backoff = Backoff(self._config.backoff_initial_s, self._config.backoff_max_s, self._rng)
        while not self._stop.is_set():
            self._report_ready.clear()
            try:
                await self._send_pending()
            except (ExchangeUnavailable, ExchangeRefused) as error:
                # Refused here means an answer we could not read: keep the report, try again.
                delay = backoff.next_delay(getattr(error, "retry_after_s", None))
                log.warning("meter: exchange unavailable (%s); %d report(s) spooled; retrying in %.1fs",
                            error, len(self._spool), delay)
                await self._sleep_or_stop(delay)
                continue
            backoff.reset()
            await self._wait_for_report()

    async def _send_pending(self) -> None:
        for report in self._spool.pending():
            delivery = await self._client.send_meter(report)
            self.sent_reports += delivery.outcome != "rejected"
            if delivery.outcome == "rejected":
                log.error("meter report %d rejected by the exchange and dropped: %s", report.seq, delivery.detail)
            elif delivery.outcome == "accepted" and delivery.detail:
                log.warning("meter report %d: %s", report.seq, delivery.detail)
            elif delivery.ack_through > report.seq:
                log.info("exchange already has meter reports up to %d", delivery.ack_through)
            self._spool.ack(delivery.ack_through)

    async def _wait_for_report(self) -> None:
        waiter = asyncio.ensure_future(self._report_ready.wait())
        stopper = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait([waiter, stopper], return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
            stopper.cancel()
            await asyncio.gather(waiter, stopper, return_exceptions=True)

    async def _wait_registered(self) -> None:
        await self._registered.wait()

    # -- control: identity, inventory, offers

    async def _control_loop(self) -> None:
        identity = await self._retrying("identity", self._client.me)
        if identity is None:
            return
        self._identity = identity
        log.info("agent of host %s (%s), fabric %s", identity.host_id, identity.name, identity.fabric)
        report = inventory_report(self._inventory)

        async def put_inventory() -> bool:
            await self._client.put_inventory(report)
            return True

        if not await self._retrying("inventory", put_inventory):
            return
        log.info("inventory: %d GPU(s) %s", len(self._inventory), sorted({gpu.model for gpu in self._inventory}))
        self._registered.set()
        loop = asyncio.get_running_loop()
        next_inventory = loop.time() + self._config.inventory_refresh_s
        while not self._stop.is_set():
            if self._policy is not None:
                await self._keep_offer(identity, self._policy)
            if loop.time() >= next_inventory:
                with contextlib.suppress(ExchangeUnavailable, ExchangeRefused):
                    await self._client.put_inventory(report)
                next_inventory = loop.time() + self._config.inventory_refresh_s
            await self._sleep_or_stop(self._config.offer_check_s)

    async def _keep_offer(self, identity: AgentIdentity, policy: Policy) -> None:
        try:
            offers = await self._client.list_offers()
            offer = self._next_offer(identity, policy, offers, self._clock())
            if offer is None:
                return
            created = await self._client.create_offer(offer)
            log.info("published offer %s: %d GPU(s) at %s from %s until %s", created.id, offer.gpus,
                     offer.floor_price, as_sent(offer.available_from) if offer.available_from else "now",
                     as_sent(offer.available_until))
        except ExchangeUnavailable as error:
            log.warning("offer: exchange unavailable (%s); will retry", error)
        except ExchangeRefused as error:
            # 409: an overlapping window exists (published meanwhile); the next check sees it.
            log.warning("offer refused: %s", error)

    def _next_offer(self, identity: AgentIdentity, policy: Policy, offers: Sequence[Offer],
                    now: float) -> OfferCreate | None:
        """The offer to publish so that one stays live, or None while the live one has time left."""
        # The listing holds live offers only; the status check keeps that true for any server.
        live_until = max((offer.available_until for offer in offers if offer.status == "live"),
                         key=epoch_s, default=None)
        if live_until is not None and epoch_s(live_until) - now >= policy.renew_before_s:
            return None
        gpus = select_gpus(policy, self._inventory)
        if not gpus:
            return None
        # Back to back: the new window starts exactly where the live one ends (the same datetime,
        # not a float round trip of it).
        starts_at = live_until if live_until is not None and epoch_s(live_until) > now else None
        firm_from_s = epoch_s(starts_at) if starts_at is not None else now
        models = {gpu.model for gpu in gpus}
        return OfferCreate(
            host_id=identity.host_id,
            gpus=len(gpus),
            floor_price=policy.floor_price,
            available_from=starts_at,
            available_until=utc(now + policy.offer_horizon_s),
            firm_until=utc(firm_from_s + policy.firm_window_s) if policy.firm_window_s else None,
            reclaim_notice_s=policy.reclaim_notice_s,
            reclaim_rate_per_h=policy.reclaim_rate_per_h,
            model=models.pop() if len(models) == 1 else None,
        )

    # -- leases and hooks

    async def _lease_loop(self) -> None:
        await self._wait_registered()
        all_gpus = {gpu.uuid for gpu in self._inventory}
        while not self._stop.is_set():
            try:
                leases = await self._live_leases()
            except (ExchangeUnavailable, ExchangeRefused) as error:
                log.warning("leases: %s", error)
            else:
                self.live_leases = len(leases)
                if self._notices is not None:  # before the hooks: a notice must not wait for one
                    self._notices.update(leases)
                actions, busy = self._lease_book.plan(leases)
                self._probe.set_busy(sorted(busy & all_gpus), True)
                self._probe.set_busy(sorted(all_gpus - busy), False)
                for action in actions:
                    key = (action.event, action.lease_id)
                    if key not in self._queued:
                        self._queued.add(key)
                        self._hook_queue.put_nowait(action)
            await self._sleep_or_stop(self._config.lease_poll_s)

    async def _live_leases(self) -> list[OwnerLease]:
        """The host's running leases, fetched by status so that the cost is the live leases, not the
        host's whole history. "active" before "ending": a lease only moves active -> ending ->
        ended, so asking in that order never misses a live one (it may be seen twice)."""
        by_id: dict[str, OwnerLease] = {}
        for status in _LIVE_LEASE_STATUSES:
            for lease in await self._client.list_leases(status):
                by_id[str(lease.id)] = lease
        return list(by_id.values())

    async def _hook_worker(self) -> None:
        while not self._stop.is_set():
            getter = asyncio.ensure_future(self._hook_queue.get())
            stopper = asyncio.ensure_future(self._stop.wait())
            try:
                await asyncio.wait([getter, stopper], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stopper.cancel()
                if not getter.done():
                    getter.cancel()
            await asyncio.gather(getter, stopper, return_exceptions=True)
            if getter.cancelled():
                return
            action = getter.result()
            if self._stop.is_set():
                return  # queued but not begun: the next start sees the lease again
            command = self._hook_command(action.event)
            if command is not None:
                assert self._policy is not None
                await run_hook(command, event=action.event, lease_id=action.lease_id, gpu_uuids=action.gpu_uuids,
                               timeout_s=self._policy.hook_timeout_s,
                               notice_file=None if self._notices is None
                               else str(self._notices.path_for(action.lease_id)))
            else:
                log.info("%s of lease %s on %s (no hook)", action.event, action.lease_id, ",".join(action.gpu_uuids))
            self._lease_book.record(action)
            self._queued.discard((action.event, action.lease_id))

    def _hook_command(self, event: HookEvent) -> str | None:
        if self._policy is None:
            return None
        return {"lease_start": self._policy.on_lease_start, "lease_end": self._policy.on_lease_end}[event]


# ---------------------------------------------------------------------------------------------
# Entry point


def agent_metrics_server(agent: Agent, spool: MeterSpool, probe: GpuProbe, hostname: str,
                         port: int) -> MetricsServer:
    """The agent's Prometheus endpoint, reading the agent's latest figures at each scrape."""

    def render() -> str:
        counters = AgentCounters(
            spool_reports=len(spool), spool_bytes=spool.pending_bytes, spool_dropped_reports=spool.dropped,
            reports_sent=agent.sent_reports, reports_refused=agent.rejected_reports, leases=agent.live_leases,
            samples_taken=agent.samples_taken)
        return render_metrics(hostname, probe.inventory(), agent.latest_samples, counters)

    return MetricsServer(render, port=port)


class DataDirLock:
    """One agent per data dir: two agents sharing a spool would reuse sequence numbers."""

    def __init__(self, data_dir: Path) -> None:
        self._path = data_dir / "agent.lock"
        self._fd: int | None = None

    def __enter__(self) -> DataDirLock:
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RuntimeError(f"another agent is using the data dir {self._path.parent}") from None
        self._fd = fd
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@contextlib.contextmanager
def _stop_on_signals(stop_event: asyncio.Event) -> Iterator[None]:
    """SIGTERM/SIGINT set ``stop_event`` (only possible from the main thread)."""
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop_event.set)
                installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


async def run_agent(
    exchange_url: str,
    token: str,
    simulate: str | None = None,
    policy_path: str | os.PathLike[str] | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    sample_interval_s: float = 1.0,
    batch_s: float = 5.0,
    clock: Clock = time.time,
    stop_event: asyncio.Event | None = None,
    *,
    host: str | None = None,
    seed: int = 0,
    config: AgentConfig | None = None,
    probe: GpuProbe | None = None,
    handle_signals: bool = True,
    transport: Transport | None = None,
    metrics_port: int | None = None,
    metadata_port: int | None = None,
) -> None:
    """Run a host agent until ``stop_event`` is set or SIGTERM/SIGINT arrives.

    ``simulate`` ("8xH100-80GB") picks simulated GPUs, else NVML. Without ``policy_path`` the
    agent meters and follows leases but publishes no offers and runs no hooks. ``host`` names the
    host for the default data dir and the simulated GPUs' UUIDs (default: machine name + token
    digest). ``config`` sets the other intervals; ``sample_interval_s``/``batch_s`` override it.
    ``metrics_port`` serves Prometheus text on 127.0.0.1 (0: a free port; None: no endpoint).
    Notices go to ``<data dir>/notices/``; ``metadata_port`` (0: any free port) also serves them
    on 127.0.0.1 (agents/notices.py).
    """
    policy = load_policy(policy_path) if policy_path is not None else None
    key = host_key(token, host)
    directory = Path(data_dir) if data_dir is not None else default_data_dir(key)
    directory.mkdir(parents=True, exist_ok=True)
    config = msgspec.structs.replace(config or AgentConfig(), sample_interval_s=sample_interval_s, batch_s=batch_s)
    stop = stop_event if stop_event is not None else asyncio.Event()
    with DataDirLock(directory):
        spool = MeterSpool(directory / "spool", max_reports=config.spool_max_reports,
                           max_bytes=config.spool_max_bytes)
        lease_book = LeaseBook(directory / "agent-state.json")
        if probe is None:
            gpu_probe = make_probe(simulate, seed=seed, clock=clock, host=key, state_dir=directory)
        else:
            gpu_probe = probe
        if policy is not None:
            try:
                select_gpus(policy, gpu_probe.inventory())  # fail now, not at the first offer
            except PolicyError as error:
                if probe is None:
                    gpu_probe.close()
                raise PolicyError(f"{policy_path}: {error}") from None
        client = ExchangeClient(exchange_url, token, timeout_s=config.request_timeout_s, transport=transport)
        metrics: MetricsServer | None = None
        log.info("agent starting: exchange %s, data dir %s, %d GPU(s), spool next seq %d (%d pending)",
                 exchange_url, directory, len(gpu_probe.inventory()), spool.next_seq, len(spool))
        notices = NoticeBoard(directory / "notices", clock=clock)
        metadata = None
        try:
            if metadata_port is not None:
                metadata = await serve_metadata(notices, metadata_port)
            agent = Agent(client=client, probe=gpu_probe, spool=spool, lease_book=lease_book, policy=policy,
                          config=config, clock=clock, stop_event=stop, seed=seed, notices=notices)
            if metrics_port is not None:
                metrics = agent_metrics_server(agent, spool, gpu_probe, host or socket.gethostname(), metrics_port)
                await metrics.start()
            with _stop_on_signals(stop) if handle_signals else contextlib.nullcontext():
                await agent.run()
        finally:
            if metrics is not None:
                await metrics.stop()
            if metadata is not None:
                metadata.close()
                await metadata.wait_closed()
            await client.aclose()
            if probe is None:
                gpu_probe.close()
            log.info("agent stopped")
