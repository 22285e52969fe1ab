from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from exchange.core.bounds import PLAIN_TEXT_PATTERN, whole
from exchange.core.money import MONEY_PATTERN
from exchange.core.structs import Struct

Role = Literal["admin", "owner", "tenant", "trader"]
Money = Annotated[str, msgspec.Meta(pattern=MONEY_PATTERN, description="USD, decimal string, ≤ 6 decimals")]
IdempotencyKey = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=PLAIN_TEXT_PATTERN)]


class AccountCreate(Struct, frozen=True, kw_only=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=whole(r"[A-Za-z0-9][A-Za-z0-9._-]*"))]
    role: Role


class AccountCreated(Struct, frozen=True, kw_only=True):
    id: int
    name: str
    role: Role
    api_key: str


class Account(Struct, frozen=True, kw_only=True):
    id: int
    name: str
    role: Role
    created_at: datetime


class DepositCreate(Struct, frozen=True, kw_only=True):
    amount: Money
    idempotency_key: IdempotencyKey


class Deposit(Struct, frozen=True, kw_only=True):
    id: int
    account_id: int
    amount: str
    idempotency_key: str
    created_at: datetime


class Balance(Struct, frozen=True, kw_only=True):
    available: str
    held: str


class LedgerEntry(Struct, frozen=True, kw_only=True):
    id: int
    transfer_id: int
    kind: str
    book: str
    amount: str
    ref_type: str | None
    ref_id: int | None
    memo: str | None
    created_at: datetime


class LedgerPage(Struct, frozen=True, kw_only=True):
    items: list[LedgerEntry]
    next: str | None
