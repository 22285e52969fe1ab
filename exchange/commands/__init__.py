"""The tenant's, owner's and admin's commands of `gpux`, over the Python client (exchange/client):
no second copy of the wire format. exchange/cli.py adds them to the `gpux` group."""
from __future__ import annotations

import click


def all_commands() -> list[click.Command]:
    from exchange.commands import account, market, owner, tenant, webhooks

    return [*account.COMMANDS, *market.COMMANDS, *tenant.COMMANDS, *owner.COMMANDS, *webhooks.COMMANDS]
