"""Webhooks: list, create (the signing secret is shown once), delete, deliveries, test."""
from __future__ import annotations

import click

from exchange.client.sync import Client
from exchange.commands.output import Output, table
from exchange.commands.session import api_command
from exchange.webhooks.schemas import EVENT_KINDS


@click.command()
@api_command
def webhooks(out: Output, api: Client) -> None:
    """Your webhooks."""
    out.emit(api.webhooks(), lambda items: table(items, [
        ("ID", lambda w: w.id), ("URL", lambda w: w.url), ("EVENTS", lambda w: w.events),
        ("STATUS", lambda w: w.status), ("FAILING SINCE", lambda w: w.failing_since),
        ("CREATED", lambda w: w.created_at)]))


@click.group()
def webhook() -> None:
    """One webhook: create, delete, enable, deliveries, test."""


@webhook.command("create")
@click.argument("url")
@click.option("--event", "events", type=click.Choice(EVENT_KINDS), multiple=True,
              help="an event to deliver (repeatable; default: all)")
@api_command
def webhook_create(out: Output, api: Client, url: str, events: tuple[str, ...]) -> None:
    """Deliver your events to URL, signed (Gpux-Signature and Standard Webhooks); the secret is shown once.

    URL must reach a public address (internal ones are refused unless the operator allows them)."""
    out.emit(api.create_webhook(url, list(events or EVENT_KINDS)))
    if not out.as_json:
        out.note("the signing secret is shown only now: keep it")


@webhook.command("delete")
@click.argument("webhook_id", type=int)
@api_command
def webhook_delete(out: Output, api: Client, webhook_id: int) -> None:
    out.emit(api.delete_webhook(webhook_id))


@webhook.command("enable")
@click.argument("webhook_id", type=int)
@api_command
def webhook_enable(out: Output, api: Client, webhook_id: int) -> None:
    """Re-enable a webhook disabled after failing for too long; what it missed is sent in order."""
    out.emit(api.enable_webhook(webhook_id))


@webhook.command("deliveries")
@click.argument("webhook_id", type=int)
@api_command
def webhook_deliveries(out: Output, api: Client, webhook_id: int) -> None:
    """The delivery log: attempts, last status, when delivered or next tried."""
    out.emit(api.webhook_deliveries(webhook_id), lambda items: table(items, [
        ("ID", lambda d: d.id), ("KIND", lambda d: d.kind), ("SEQ", lambda d: d.seq),
        ("ATTEMPTS", lambda d: d.attempts), ("STATUS", lambda d: d.last_status_code),
        ("ERROR", lambda d: d.last_error), ("DELIVERED", lambda d: d.delivered_at),
        ("NEXT", lambda d: d.next_attempt_at)]))


@webhook.command("test")
@click.argument("webhook_id", type=int)
@api_command
def webhook_test(out: Output, api: Client, webhook_id: int) -> None:
    """Queue a signed ping to the webhook's URL."""
    out.emit(api.test_webhook(webhook_id))


COMMANDS = [webhooks, webhook]
