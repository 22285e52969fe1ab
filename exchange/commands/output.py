"""How every API command of the CLI answers: a table (or `key: value` lines) for people, one JSON
document on stdout with `--json` for programs, and on failure the API's code and message on stderr
(with `--json`, also the error object on stdout) and a non-zero exit status:

    1  the exchange refused (4xx/5xx: its code and message)
    2  bad usage or no profile (click's own status for usage errors)
    3  the exchange could not be reached
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

import click
import msgspec

from exchange.client.errors import ApiError, ConnectionFailed
from exchange.commands.profile import ProfileError

EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

Column = tuple[str, Callable[[Any], Any]]


def to_json(value: Any) -> str:
    """Structs, lists of structs, dicts: one JSON document, the wire's own spelling of every field."""
    return msgspec.json.format(msgspec.json.encode(value), indent=2).decode()


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(cell(v) for v in value) or "-"
    return str(value)


def table(items: Iterable[Any], columns: Sequence[Column]) -> str:
    rows = [[h for h, _ in columns]] + [[cell(get(item)) for _, get in columns] for item in items]
    widths = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines) if len(rows) > 1 else lines[0] + "\n(none)"


def fields(value: msgspec.Struct) -> str:
    """One object as aligned `field: value` lines, every field the API returned, nested ones indented."""
    data = msgspec.structs.asdict(value)
    width = max((len(k) for k in data), default=0)
    lines = []
    for key, item in data.items():
        if isinstance(item, list) and item and isinstance(item[0], msgspec.Struct):
            lines.append(f"{key}:")
            lines += ["  " + line for entry in item for line in (fields(entry) + "\n").splitlines()]
        elif isinstance(item, msgspec.Struct):
            lines.append(f"{key}:")
            lines += ["  " + line for line in fields(item).splitlines()]
        else:
            lines.append(f"{key.ljust(width)}  {cell(item)}")
    return "\n".join(lines)


class Output:
    """One invocation's way of answering."""

    def __init__(self, as_json: bool) -> None:
        self.as_json = as_json

    def emit(self, value: Any, text: Callable[[Any], str] | None = None) -> None:
        """The value as JSON, or as `text(value)` (default: its fields) for people."""
        if self.as_json:
            click.echo(to_json(value))
        else:
            click.echo(text(value) if text else fields(value))

    def note(self, message: str) -> None:
        """A remark for people on stderr, so it never mixes with JSON on stdout."""
        click.echo(message, err=True)

    def fail(self, status: int, code: str, message: str, field: str | None, exit_code: int) -> None:
        click.echo(f"gpux: error: {code}: {message}" + (f" (field: {field})" if field else ""), err=True)
        if self.as_json:
            error: dict[str, Any] = {"code": code, "message": message}
            if field:
                error["field"] = field
            if status:
                error["status"] = status
            click.echo(to_json({"error": error}))
        sys.exit(exit_code)


def json_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--json", "as_json", is_flag=True, help="print one JSON document instead of a table")(fn)


def answers(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a command body `fn(out, **options)` into a click callback with `--json` that maps the
    client's exceptions to an error line and exit status. A subcommand also honours `--json` given
    to its group (`gpux bid --json show 7`)."""

    @json_option
    @functools.wraps(fn)
    def callback(as_json: bool, **options: Any) -> None:
        parent = click.get_current_context().find_object(Output)
        out = Output(as_json or bool(parent and parent.as_json))
        try:
            fn(out, **options)
        except ApiError as exc:
            out.fail(exc.status, exc.code, exc.message, exc.field, EXIT_REFUSED)
        except ConnectionFailed as exc:
            out.fail(0, "unreachable", str(exc), None, EXIT_UNREACHABLE)
        except ProfileError as exc:
            out.fail(0, "no_profile", str(exc), None, EXIT_USAGE)
        except InputError as exc:
            out.fail(0, "invalid_option", str(exc), exc.field, EXIT_USAGE)

    return callback


class InputError(Exception):
    """An option the CLI itself could not read (a duration, a time), before anything is sent."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
