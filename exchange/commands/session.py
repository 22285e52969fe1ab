"""A command's connection: the profile it names (or the default one) as a blocking client."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import click

from exchange.client.sync import Client
from exchange.commands.output import answers
from exchange.commands.profile import Profile, config_path, is_private, load_config, resolve


PROFILE_META = "gpux.profile"  # a group's --profile, seen by its subcommands through ctx.meta


def chosen_profile(profile_name: str | None) -> Profile:
    path = config_path()
    profile = resolve(load_config(path), profile_name)
    if profile.name is not None and not is_private(path):
        click.echo(f"gpux: warning: {path} holds API keys and others may read it; run chmod 600 {path}", err=True)
    return profile


@contextmanager
def connect(profile_name: str | None) -> Iterator[Client]:
    profile = chosen_profile(profile_name)
    with Client(profile.url, profile.key) as api:
        yield api


def api_command(fn: Callable[..., Any]) -> Callable[..., Any]:
    """A command body `fn(out, api, **options)` that talks to the exchange as the chosen profile."""

    @answers
    @click.option("--profile", envvar="GPUX_PROFILE", default=None,
                  help="the profile to use (gpux login --profile); default: the config's default")
    @functools.wraps(fn)
    def body(out: Any, profile: str | None, **options: Any) -> None:
        ctx = click.get_current_context()
        if isinstance(ctx.command, click.Group) and ctx.invoked_subcommand is not None:
            # `gpux bid show 7`: the group only passes its --json and --profile down.
            ctx.obj = out
            ctx.meta[PROFILE_META] = profile
            return
        with connect(profile or ctx.meta.get(PROFILE_META)) as api:
            fn(out, api, **options)

    return body
