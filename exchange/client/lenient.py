"""Reply types that ignore fields and values they do not know.

The server's wire structs refuse unknown fields: right for what the server *reads* (a typo in a
request fails loudly). For what a client *reads* it is wrong: a client installed before the server
grew a field would break on every answer carrying it. So replies are decoded as subclasses of the
server's structs, derived here mechanically, that differ only in ignoring unknown fields. Each shape
is still defined once (the server's struct); `isinstance(reply, Bid)` holds.

The same holds for values: a closed set of values (a `Literal`, e.g. a lease status) grows on the
server too, so it is read as its plain type (str) and the reader decides what an unknown value
means (the host agent leaves a lease in an unknown status alone)."""
from __future__ import annotations

import types
import typing
from typing import Annotated, Any, Literal, Union

import msgspec

_cache: dict[Any, Any] = {}


def lenient(tp: Any) -> Any:
    """`tp` with every Struct in it (nested in lists, unions, Annotated) replaced by a subclass
    that ignores unknown fields."""
    try:
        return _cache[tp]
    except (KeyError, TypeError):
        pass
    result = _derive(tp)
    try:
        _cache[tp] = result
    except TypeError:
        pass
    return result


def _derive(tp: Any) -> Any:
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        fields: list[Any] = []
        for f in msgspec.structs.fields(tp):
            kind = lenient(f.type)
            if f.default is not msgspec.NODEFAULT:
                fields.append((f.name, kind, f.default))
            elif f.default_factory is not msgspec.NODEFAULT:
                fields.append((f.name, kind, msgspec.field(default_factory=f.default_factory)))
            else:
                fields.append((f.name, kind))
        return msgspec.defstruct(tp.__name__, fields, bases=(tp,), module=tp.__module__,
                                 forbid_unknown_fields=False)
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        kinds = tuple(dict.fromkeys(type(a) for a in args))
        return kinds[0] if len(kinds) == 1 else Union[kinds]  # type: ignore[return-value]
    if origin is Annotated:
        return Annotated[(lenient(args[0]), *tp.__metadata__)]  # type: ignore[return-value]
    if origin in (Union, types.UnionType):
        return Union[tuple(lenient(a) for a in args)]  # type: ignore[return-value]
    if origin in (list, tuple, set, frozenset, dict) and args:
        return origin[tuple(lenient(a) for a in args)] if origin is not list else list[lenient(args[0])]
    return tp
