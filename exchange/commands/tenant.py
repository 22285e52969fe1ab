"""The tenant's commands: quote, bid (and bid show), bids, cancel, leases (and lease show), cost,
events (the private stream)."""
from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from itertools import islice
from typing import Any

import click
import msgspec

from exchange.bids.schemas import Bid
from exchange.client.aio import AsyncClient
from exchange.client.sync import Client
from exchange.commands.output import Output, answers, fields, table
from exchange.commands.session import api_command, chosen_profile
from exchange.commands.terms import duration_s, moment
from exchange.core.money import parse_money


def bid_terms(fn: Callable[..., Any]) -> Callable[..., Any]:
    """The options that spell a bid's terms, shared by `quote` and `bid` so both read them alike.
    None of them is required at click's level: `bid show` shares the group and needs none."""
    options = [
        click.option("--market", help="model and tier, e.g. H100-80GB/spot"),
        click.option("--gpus", type=int, help="GPUs, as one gang"),
        click.option("--duration", help="how long, e.g. 4h, 90m, 3600 (seconds)"),
        click.option("--limit-price", "--price", "limit_price", help="the most you pay, USD per GPU-hour, e.g. 2.50"),
        click.option("--min-survival", type=float, default=None,
                     help="spot: lowest acceptable chance (0..1) of running the whole duration"),
        click.option("--min-notice", default=None, help="spot: shortest reclaim notice you accept, e.g. 2m"),
        click.option("--tif", "time_in_force", type=click.Choice(["gtc", "ioc", "gtd"]), default=None,
                     help="time in force (default gtc; gtd needs --expire-at)"),
        click.option("--expire-at", default=None, help="gtd: when the bid expires (RFC 3339 or +DURATION)"),
        click.option("--requeue/--no-requeue", "requeue_on_preempt", default=None,
                     help="rest again as a new bid when a lease of it is preempted"),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _terms(market: str | None, gpus: int | None, duration: str | None, limit_price: str | None,
           min_survival: float | None, min_notice: str | None, time_in_force: str | None, expire_at: str | None,
           requeue_on_preempt: bool | None) -> dict[str, Any]:
    """The bid's fields for the client, only those given (the exchange's defaults for the rest)."""
    missing = [name for name, value in (("--market", market), ("--gpus", gpus), ("--duration", duration),
                                        ("--limit-price", limit_price)) if value is None]
    if missing:
        raise click.UsageError(f"missing option(s): {', '.join(missing)}")
    terms: dict[str, Any] = {"market": market, "gpus": gpus, "duration_s": duration_s("--duration", duration or ""),
                             "limit_price": limit_price}
    optional = {"min_survival": min_survival,
                "min_notice_s": duration_s("--min-notice", min_notice) if min_notice is not None else None,
                "time_in_force": time_in_force,
                "expire_at": moment("--expire-at", expire_at) if expire_at is not None else None,
                "requeue_on_preempt": requeue_on_preempt}
    return terms | {k: v for k, v in optional.items() if v is not None}


@click.command()
@bid_terms
@api_command
def quote(out: Output, api: Client, **options: Any) -> None:
    """A dry run of a bid against the book now: would it fill, at what price, on how many eligible
    GPUs, and if not, why and by how much. Nothing is placed or held."""
    out.emit(api.quote(**_terms(**options)), lambda q: _quote_line(q) + "\n" + fields(q))


def _quote_line(q: Any) -> str:
    if q.would_fill:
        return (f"would fill now: {q.gpus} GPU(s) of {q.market} at {q.price}/GPU-h (limit {q.limit_price}),"
                f" {q.eligible_gpus} eligible GPU(s) free; placing it holds {q.hold} of {q.available} available")
    shortfall = f", short by {q.unfilled_shortfall}" if q.unfilled_shortfall else ""
    return (f"would not fill now: {q.unfilled_reason}{shortfall}; {q.eligible_gpus} eligible GPU(s) free;"
            f" placing it holds {q.hold} of {q.available} available")


def _differences(asked: dict[str, Any], bid: Bid) -> list[str]:
    """Terms the exchange holds that differ from those asked (a client_order_id already used with
    other terms answers the first bid): said out loud, never silently. The bid was placed, so the
    limit asked was a valid amount: compared in micro-dollars ("2.5" is "2.50")."""
    held = msgspec.structs.asdict(bid)
    different = []
    for name, value in asked.items():
        same = parse_money(value) == parse_money(held[name]) if name == "limit_price" else value == held[name]
        if not same:
            different.append(f"{name}: asked {value}, holds {held[name]}")
    return different


def _bid_line(b: Bid) -> str:
    hours = b.duration_s / 3600
    return (f"bid {b.id} {b.status}: {b.gpus} GPU(s) of {b.market} for {hours:g} h at <= {b.limit_price}/GPU-h,"
            f" hold {b.hold}, client_order_id {b.client_order_id}")


@click.group(invoke_without_command=True)
@bid_terms
@click.option("--client-order-id", default=None,
              help="idempotency key: the same id again is the same bid (default: a new one, reused by retries)")
@api_command
def bid(out: Output, api: Client, client_order_id: str | None, **options: Any) -> None:
    """Place a bid (every term an option), or `bid show ID`. Echoes the terms the exchange holds."""
    terms = _terms(**options)
    placed = api.place_bid(client_order_id=client_order_id, **terms)
    for difference in _differences(terms, placed):
        out.note(f"gpux: warning: the exchange holds other terms for this client_order_id: {difference}")
    out.emit(placed, lambda b: _bid_line(b) + "\n" + fields(b))


@bid.command("show")
@click.argument("bid_id", type=int)
@api_command
def bid_show(out: Output, api: Client, bid_id: int) -> None:
    """One bid, with why it has not filled (unfilled_reason, unfilled_shortfall)."""
    out.emit(api.bid(bid_id), lambda b: _bid_line(b) + "\n" + fields(b))


def _list_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--all", "every", is_flag=True, help="every one, however many")(fn)
    return click.option("--limit", default=50, show_default=True, type=click.IntRange(1), help="at most this many")(fn)


def _some(items: Any, limit: int, every: bool) -> list[Any]:
    return list(items if every else islice(items, limit))


@click.command()
@click.option("--status", type=click.Choice(["open", "filled", "cancelled", "expired"]), default=None)
@_list_options
@api_command
def bids(out: Output, api: Client, status: str | None, limit: int, every: bool) -> None:
    """Your bids, newest first."""
    out.emit(_some(api.bids(status), limit, every), lambda items: table(items, [
        ("ID", lambda b: b.id), ("MARKET", lambda b: b.market), ("GPUS", lambda b: b.gpus),
        ("DURATION_S", lambda b: b.duration_s), ("LIMIT", lambda b: b.limit_price), ("STATUS", lambda b: b.status),
        ("HOLD", lambda b: b.hold), ("UNFILLED", lambda b: b.unfilled_reason),
        ("SHORTFALL", lambda b: b.unfilled_shortfall), ("CREATED", lambda b: b.created_at)]))


@click.command()
@click.argument("bid_id", type=int)
@api_command
def cancel(out: Output, api: Client, bid_id: int) -> None:
    """Cancel an open bid (its hold is released)."""
    out.emit(api.cancel_bid(bid_id), _bid_line)


_LEASE_COLUMNS = [
    ("ID", lambda le: le.id), ("MARKET", lambda le: le.market), ("HOST", lambda le: le.host_id),
    ("GPUS", lambda le: le.gpus), ("PRICE", lambda le: le.price), ("STATUS", lambda le: le.status),
    ("START", lambda le: le.start_at), ("END", lambda le: le.end_at or le.planned_end_at),
    ("END_REASON", lambda le: le.end_reason), ("BILLED_GPU_H", lambda le: le.billed_gpu_hours),
    ("CHARGED", lambda le: le.charged)]


@click.command()
@click.option("--status", type=click.Choice(["active", "ending", "ended", "failed"]), default=None)
@_list_options
@api_command
def leases(out: Output, api: Client, status: str | None, limit: int, every: bool) -> None:
    """Your leases (a tenant's, or the leases on an owner's hosts), newest first."""
    out.emit(_some(api.leases(status), limit, every), lambda items: table(items, _LEASE_COLUMNS))


@click.group()
def lease() -> None:
    """One lease."""


@lease.command("show")
@click.argument("lease_id", type=int)
@api_command
def lease_show(out: Output, api: Client, lease_id: int) -> None:
    """One lease: GPUs, price, times, what it was billed."""
    out.emit(api.lease(lease_id))


@click.command()
@click.argument("bid_id", type=int)
@api_command
def cost(out: Output, api: Client, bid_id: int) -> None:
    """What a bid has cost so far over all its leases."""
    out.emit(api.bid_cost(bid_id))


@click.command()
@click.option("--since", type=click.IntRange(0), default=None,
              help="the events after this seq (default: all of them; with --follow: from now on)")
@click.option("--follow", "-f", is_flag=True, help="keep printing events as they happen (resumes after a drop)")
@click.option("--count", type=click.IntRange(1), default=None, help="--follow: stop after this many events")
@click.option("--seconds", type=float, default=None, help="--follow: stop after this long")
@click.option("--profile", envvar="GPUX_PROFILE", default=None)
@answers
def events(out: Output, since: int | None, follow: bool, count: int | None, seconds: float | None,
           profile: str | None) -> None:
    """Your private events (fill, lease_started, notice, lease_ended): the stored ones after --since,
    or with --follow as they happen. --json: one JSON array; with --follow, JSON Lines (one event
    per line, as they come)."""
    chosen = chosen_profile(profile)
    if not follow:
        history = asyncio.run(_history(chosen.url, chosen.key, since or 0))
        out.emit(history, lambda items: "\n".join(_event_line(e) for e in items) or "(none)")
        return
    emit = functools.partial(_emit_event, out)
    try:
        asyncio.run(_follow(chosen.url, chosen.key, since, count, seconds, emit))
    except KeyboardInterrupt:
        pass


async def _history(url: str, key: str | None, since: int) -> list[Any]:
    async with AsyncClient(url, key) as api:
        return [event async for event in api.stream(since, follow=False, max_reconnects=3)]


async def _follow(url: str, key: str | None, since: int | None, count: int | None, seconds: float | None,
                  emit: Callable[[Any], None]) -> None:
    async with AsyncClient(url, key) as api:
        async def take() -> None:
            seen = 0
            async for event in api.stream(since):
                emit(event)
                seen += 1
                if count is not None and seen >= count:
                    return
        try:
            await asyncio.wait_for(take(), seconds)
        except asyncio.TimeoutError:
            pass


def _event_line(event: Any) -> str:
    lease_ = event.data
    return (f"{event.seq:>6}  {event.type:<13} lease {lease_.id} {lease_.status:<7} {lease_.gpus} GPU(s)"
            f" {lease_.market} at {lease_.price}" + (f"  ends {lease_.end_at}" if lease_.end_at else ""))


def _emit_event(out: Output, event: Any) -> None:
    click.echo(msgspec.json.encode(event).decode() if out.as_json else _event_line(event))


COMMANDS = [quote, bid, bids, cancel, leases, lease, cost, events]
