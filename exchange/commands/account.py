"""Profile and money commands: login/logout/whoami, balance, ledger; the admin's account create and
deposit."""
from __future__ import annotations

from itertools import islice
from typing import Any

import click

from exchange.client.sync import Client
from exchange.commands.output import Output, answers, table
from exchange.commands.profile import (DEFAULT_PROFILE, config_path, load_config, update_config, with_profile,
                                       without_profile)
from exchange.commands.session import api_command
from exchange.core.structs import Struct


class LoggedIn(Struct, frozen=True, kw_only=True):
    profile: str
    url: str
    config: str
    account_id: int
    name: str
    role: str


@click.command()
@click.option("--url", required=True, envvar="GPUX_URL", help="the exchange's base URL, e.g. http://127.0.0.1:8000")
@click.option("--key", required=True, envvar="GPUX_API_KEY", help="your API key")
@click.option("--profile", "profile_name", default=DEFAULT_PROFILE, show_default=True, help="save as this profile")
@click.option("--default/--no-default", "make_default", default=True, show_default=True,
              help="make it the profile used when none is named")
@answers
def login(out: Output, url: str, key: str, profile_name: str, make_default: bool) -> None:
    """Check URL and KEY against the exchange, then save them as a profile (config file, mode 0600)."""
    with Client(url, key) as api:
        account = api.me()  # refuses a wrong key or URL before anything is saved
    path = config_path()
    update_config(path, lambda config: with_profile(config, profile_name, url, key, make_default))
    out.emit(LoggedIn(profile=profile_name, url=url.rstrip("/"), config=str(path), account_id=account.id,
                      name=account.name, role=account.role),
             lambda v: f"logged in to {v.url} as {v.name} ({v.role}, account {v.account_id}); "
                       f"profile {v.profile!r} saved in {v.config}")


@click.command()
@click.option("--profile", "profile_name", default=DEFAULT_PROFILE, show_default=True)
@answers
def logout(out: Output, profile_name: str) -> None:
    """Forget a profile's URL and key."""
    path = config_path()
    found = profile_name in load_config(path).profiles
    if found:
        update_config(path, lambda config: without_profile(config, profile_name))
    out.emit({"profile": profile_name, "removed": found},
             lambda v: f"profile {profile_name!r} " + ("removed" if found else "was not there"))


@click.command()
@api_command
def whoami(out: Output, api: Client) -> None:
    """The account the profile's key belongs to."""
    out.emit(api.me())


@click.command()
@click.option("--account", "account_id", type=int, default=None, help="(admin) another account's balance")
@api_command
def balance(out: Output, api: Client, account_id: int | None) -> None:
    """Available and held money, USD."""
    out.emit(api.balance(account_id))


@click.command()
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1), help="at most this many entries")
@click.option("--all", "every", is_flag=True, help="every entry, however many")
@api_command
def ledger(out: Output, api: Client, limit: int, every: bool) -> None:
    """The account's ledger entries, newest first."""
    entries = list(api.ledger() if every else islice(api.ledger(), limit))
    out.emit(entries, lambda items: table(items, [
        ("ID", lambda e: e.id), ("TRANSFER", lambda e: e.transfer_id), ("KIND", lambda e: e.kind),
        ("BOOK", lambda e: e.book), ("AMOUNT", lambda e: e.amount), ("REF", lambda e: _ref(e)),
        ("AT", lambda e: e.created_at)]))


def _ref(entry: Any) -> str:
    return f"{entry.ref_type}/{entry.ref_id}" if entry.ref_type else "-"


@click.group()
def account() -> None:
    """(admin) Accounts."""


@account.command("create")
@click.argument("name")
@click.option("--role", required=True, type=click.Choice(["owner", "tenant", "trader", "admin"]))
@api_command
def account_create(out: Output, api: Client, name: str, role: str) -> None:
    """Create an account; its API key is shown once."""
    created = api.create_account(name, role)
    out.emit(created)
    if not out.as_json:
        out.note("the API key is shown only now: keep it")


@account.command("balance")
@click.argument("account_id", type=int)
@api_command
def account_balance(out: Output, api: Client, account_id: int) -> None:
    """Another account's balance."""
    out.emit(api.balance(account_id))


@click.command()
@click.argument("account_id", type=int)
@click.argument("amount")
@click.option("--key", "idempotency_key", default=None,
              help="idempotency key: the same key again is the same deposit (default: a new one)")
@api_command
def deposit(out: Output, api: Client, account_id: int, amount: str, idempotency_key: str | None) -> None:
    """(admin) Credit AMOUNT USD (e.g. 100.00) to ACCOUNT_ID."""
    out.emit(api.deposit(account_id, amount, idempotency_key=idempotency_key))


COMMANDS = [login, logout, whoami, balance, ledger, account, deposit]

