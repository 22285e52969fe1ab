"""The owner's commands: hosts, host create/show, offers, offer create/show/withdraw, reclaim (and
reclaim show/release), reclaims, earnings."""
from __future__ import annotations

from decimal import Decimal
from typing import Any

import click

from exchange.client.sync import Client
from exchange.commands.output import Output, fields, table
from exchange.commands.session import api_command
from exchange.commands.terms import duration_s, moment
from exchange.core.money import format_money, parse_money
from exchange.core.structs import Struct
from exchange.hosts.schemas import EarningsFigures, HostEarnings


@click.command()
@api_command
def hosts(out: Output, api: Client) -> None:
    """Your hosts and their GPUs."""
    out.emit(api.hosts(), lambda items: table(items, [
        ("ID", lambda h: h.id), ("NAME", lambda h: h.name), ("FABRIC", lambda h: h.fabric),
        ("GPUS", lambda h: len(h.gpus)), ("MODELS", lambda h: sorted({g.model for g in h.gpus})),
        ("LAST SEEN", lambda h: h.last_seen_at)]))


@click.group()
def host() -> None:
    """One host: create, show."""


@host.command("create")
@click.argument("name")
@click.option("--fabric", default="default", show_default=True, help="interconnect domain (e.g. an InfiniBand pod)")
@api_command
def host_create(out: Output, api: Client, name: str, fabric: str) -> None:
    """Register a host; its agent token is shown once (`gpux agent --token`)."""
    out.emit(api.create_host(name, fabric))
    if not out.as_json:
        out.note("the agent token is shown only now: give it to `gpux agent --token`")


@host.command("show")
@click.argument("host_id", type=int)
@api_command
def host_show(out: Output, api: Client, host_id: int) -> None:
    out.emit(api.host(host_id))


_OFFER_COLUMNS = [
    ("ID", lambda o: o.id), ("HOST", lambda o: o.host_id), ("MODEL", lambda o: o.model), ("GPUS", lambda o: o.gpus),
    ("FLOOR", lambda o: o.floor_price), ("FROM", lambda o: o.available_from), ("UNTIL", lambda o: o.available_until),
    ("FIRM UNTIL", lambda o: o.firm_until), ("NOTICE_S", lambda o: o.reclaim_notice_s),
    ("RATE/H", lambda o: o.reclaim_rate_per_h), ("STATUS", lambda o: o.status)]


@click.command()
@click.option("--status", type=click.Choice(["live", "withdrawn"]), default=None)
@api_command
def offers(out: Output, api: Client, status: str | None) -> None:
    """Your offers."""
    out.emit(api.offers(status), lambda items: table(items, _OFFER_COLUMNS))


@click.group()
def offer() -> None:
    """One offer: create, show, withdraw."""


@offer.command("create")
@click.option("--host", "host_id", type=int, required=True)
@click.option("--gpus", type=int, required=True)
@click.option("--floor-price", "--floor", "floor_price", required=True, help="lowest price, USD per GPU-hour")
@click.option("--until", "until", required=True, help="available until (RFC 3339 or +DURATION, e.g. +24h)")
@click.option("--from", "available_from", default=None, help="available from (default: now)")
@click.option("--firm-until", default=None, help="no reclaim before this time")
@click.option("--notice", default=None, help="reclaim notice spot tenants get, e.g. 2m (default 120 s)")
@click.option("--rate-per-h", "reclaim_rate_per_h", type=float, default=None, help="forecast reclaim hazard per hour")
@click.option("--model", default=None, help="GPU model (default: the host's)")
@api_command
def offer_create(out: Output, api: Client, host_id: int, gpus: int, floor_price: str, until: str,
                 available_from: str | None, firm_until: str | None, notice: str | None,
                 reclaim_rate_per_h: float | None, model: str | None) -> None:
    """Publish GPUs of a host for sale."""
    options: dict[str, Any] = {
        "available_from": moment("--from", available_from) if available_from else None,
        "firm_until": moment("--firm-until", firm_until) if firm_until else None,
        "reclaim_notice_s": duration_s("--notice", notice) if notice is not None else None,
        "reclaim_rate_per_h": reclaim_rate_per_h, "model": model}
    created = api.create_offer(host_id, gpus, floor_price, moment("--until", until),
                               **{k: v for k, v in options.items() if v is not None})
    out.emit(created)


@offer.command("show")
@click.argument("offer_id", type=int)
@api_command
def offer_show(out: Output, api: Client, offer_id: int) -> None:
    out.emit(api.offer(offer_id))


@offer.command("withdraw")
@click.argument("offer_id", type=int)
@api_command
def offer_withdraw(out: Output, api: Client, offer_id: int) -> None:
    """Withdraw an offer: its free GPUs leave the book; running leases are not ended by this."""
    out.emit(api.withdraw_offer(offer_id))


def _reclaim_text(r: Any) -> str:
    head = (f"reclaim {r.id} {r.status}: {r.gpus} {r.model} GPU(s) at {r.at}; {r.taken_free} free,"
            f" {len(r.leases)} lease(s) ending, shortfall {r.shortfall}")
    return head + "\n" + fields(r)


@click.group(invoke_without_command=True)
@click.option("--model", default=None, help="GPU model to take back, e.g. H100-80GB")
@click.option("--gpus", type=int, default=None)
@click.option("--host", "host_id", type=int, default=None, help="only on this host")
@click.option("--at", default=None, help="when (RFC 3339 or +DURATION; default now, after each lease's notice)")
@click.option("--until", default=None, help="give the GPUs back at this time (an internal reservation)")
@click.option("--strategy", default=None, help="which leases to end first (see README, Reclaims)")
@click.option("--key", "idempotency_key", default=None,
              help="idempotency key: the same key again is the same reclaim (default: a new one, reused by retries)")
@api_command
def reclaim(out: Output, api: Client, model: str | None, gpus: int | None, host_id: int | None, at: str | None,
            until: str | None, strategy: str | None, idempotency_key: str | None) -> None:
    """Take GPUs back (free ones first, then leases after their notice), or `reclaim show|release ID`."""
    if model is None or gpus is None:
        raise click.UsageError("missing option(s): " + ", ".join(
            name for name, value in (("--model", model), ("--gpus", gpus)) if value is None))
    options: dict[str, Any] = {"host_id": host_id, "strategy": strategy,
                               "at": moment("--at", at) if at else None,
                               "until": moment("--until", until) if until else None}
    made = api.reclaim(model, gpus, idempotency_key=idempotency_key,
                       **{k: v for k, v in options.items() if v is not None})
    out.emit(made, _reclaim_text)


@reclaim.command("show")
@click.argument("reclaim_id", type=int)
@api_command
def reclaim_show(out: Output, api: Client, reclaim_id: int) -> None:
    out.emit(api.get_reclaim(reclaim_id), _reclaim_text)


@reclaim.command("release")
@click.argument("reclaim_id", type=int)
@api_command
def reclaim_release(out: Output, api: Client, reclaim_id: int) -> None:
    """Give a reservation's GPUs back to the market before its `until`."""
    out.emit(api.release_reclaim(reclaim_id), _reclaim_text)


@click.command()
@api_command
def reclaims(out: Output, api: Client) -> None:
    """Your reclaims and reservations."""
    out.emit(api.reclaims(), lambda items: table(items, [
        ("ID", lambda r: r.id), ("MODEL", lambda r: r.model), ("GPUS", lambda r: r.gpus),
        ("HOST", lambda r: r.host_id), ("AT", lambda r: r.at), ("UNTIL", lambda r: r.until),
        ("STATUS", lambda r: r.status), ("FREE", lambda r: r.taken_free), ("LEASES", lambda r: len(r.leases)),
        ("SHORTFALL", lambda r: r.shortfall)]))


class EarningsTotal(EarningsFigures, frozen=True, kw_only=True):
    hosts: int


class Earnings(Struct, frozen=True, kw_only=True):
    """`gpux earnings --json`: each host's figures as the exchange gives them, and their sum."""
    hosts: list[HostEarnings]
    total: EarningsTotal


def total_earnings(per_host: list[HostEarnings]) -> EarningsTotal:
    """Sum the hosts' figures exactly: money in integer micro-dollars, hours and kWh as decimals."""
    def money(name: str) -> str:
        return format_money(sum(parse_money(getattr(e, name)) for e in per_host))

    def decimal(name: str) -> str:
        return str(sum((Decimal(getattr(e, name)) for e in per_host), Decimal(0)))

    return EarningsTotal(hosts=len(per_host), leases=sum(e.leases for e in per_host),
                         billed_gpu_hours=decimal("billed_gpu_hours"), charged=money("charged"), fees=money("fees"),
                         earned=money("earned"), energy_kwh=decimal("energy_kwh"))


def _earnings_text(e: Earnings) -> str:
    columns = [("HOST", lambda x: x.host_id), ("LEASES", lambda x: x.leases),
               ("BILLED_GPU_H", lambda x: x.billed_gpu_hours), ("CHARGED", lambda x: x.charged),
               ("FEES", lambda x: x.fees), ("EARNED", lambda x: x.earned), ("ENERGY_KWH", lambda x: x.energy_kwh)]
    return table([*e.hosts, _TotalRow(e.total)], columns)


class _TotalRow:
    def __init__(self, total: EarningsTotal) -> None:
        self.host_id = "total"
        self.leases, self.billed_gpu_hours, self.charged = total.leases, total.billed_gpu_hours, total.charged
        self.fees, self.earned, self.energy_kwh = total.fees, total.earned, total.energy_kwh


@click.command()
@click.option("--host", "host_ids", type=int, multiple=True, help="only these hosts (repeatable; default: all yours)")
@api_command
def earnings(out: Output, api: Client, host_ids: tuple[int, ...]) -> None:
    """What your hosts earned: charged to tenants, the exchange's fees, and your net, per host and in all."""
    ids = list(host_ids) or [h.id for h in api.hosts()]
    per_host = [api.host_earnings(host_id) for host_id in ids]
    out.emit(Earnings(hosts=per_host, total=total_earnings(per_host)), _earnings_text)


COMMANDS = [hosts, host, offers, offer, reclaim, reclaims, earnings]
