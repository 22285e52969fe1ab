"""The one base for every wire and domain struct: frozen, keyword-only, unknown fields refused."""
from __future__ import annotations

import msgspec


class Struct(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class Page(Struct, frozen=True, kw_only=True):
    next: str | None = None
