"""The double-entry ledger: the only code that moves money. Every movement is one transfer whose
postings sum to zero (the schema refuses anything else at commit)."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from exchange.core.errors import InsufficientFunds
from exchange.core.money import format_money


@dataclass(frozen=True, slots=True)
class Books:
    """The ledger accounts of one exchange account."""
    available: int
    held: int


async def open_books(conn: asyncpg.Connection, account_id: int) -> Books:
    rows = await conn.fetch(
        "INSERT INTO ledger_accounts (account_id, kind) VALUES ($1, 'available'), ($1, 'held') RETURNING id, kind",
        account_id)
    ids = {r["kind"]: r["id"] for r in rows}
    return Books(available=ids["available"], held=ids["held"])


async def books_of(conn: asyncpg.Connection, account_id: int) -> Books:
    rows = await conn.fetch("SELECT id, kind FROM ledger_accounts WHERE account_id = $1", account_id)
    ids = {r["kind"]: r["id"] for r in rows}
    return Books(available=ids["available"], held=ids["held"])


async def system_book(conn: asyncpg.Connection, kind: str) -> int:
    return await conn.fetchval("SELECT id FROM ledger_accounts WHERE account_id IS NULL AND kind = $1", kind)


async def post_transfer(conn: asyncpg.Connection, *, kind: str, account_id: int | None,
                        postings: list[tuple[int, int]], now: datetime, ref_type: str | None = None,
                        ref_id: int | None = None, idempotency_key: str | None = None,
                        request_hash: bytes | None = None, memo: str | None = None) -> int:
    """Write one transfer. Must run inside the caller's transaction (the balance check is deferred
    to its commit). Zero-amount postings are dropped; a transfer with nothing left is still recorded
    when it carries an idempotency key, so that a retry finds it."""
    legs = [(book, amount) for book, amount in postings if amount != 0]
    if sum(amount for _, amount in legs) != 0:
        raise ValueError(f"transfer {kind} does not sum to zero: {legs}")
    # One statement: the transfer and its postings (the hot path of every bid).
    transfer_id = await conn.fetchval(
        "WITH t AS (INSERT INTO transfers (kind, account_id, ref_type, ref_id, idempotency_key, request_hash, memo,"
        " created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id),"
        " p AS (INSERT INTO postings (transfer_id, ledger_account_id, amount)"
        " SELECT t.id, leg.book, leg.amount FROM t, unnest($9::bigint[], $10::bigint[]) AS leg(book, amount))"
        " SELECT id FROM t",
        kind, account_id, ref_type, ref_id, idempotency_key, request_hash, memo, now,
        [book for book, _ in legs], [amount for _, amount in legs])
    return transfer_id


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """One transfer to write in bulk with `post_transfers`."""
    kind: str
    account_id: int | None
    postings: list[tuple[int, int]]
    ref_type: str | None = None
    ref_id: int | None = None
    memo: str | None = None


async def post_transfers(conn: asyncpg.Connection, specs: list[TransferSpec], now: datetime) -> list[int]:
    """Many transfers in two statements (settlement bills thousands of leases per run). Same rules
    as `post_transfer`: each sums to zero, checked here and again by the schema at commit."""
    specs = [spec for spec in specs if any(amount for _, amount in spec.postings)]
    for spec in specs:
        if sum(amount for _, amount in spec.postings) != 0:
            raise ValueError(f"transfer {spec.kind} does not sum to zero: {spec.postings}")
    if not specs:
        return []
    rows = await conn.fetch(
        "INSERT INTO transfers (kind, account_id, ref_type, ref_id, memo, created_at)"
        " SELECT k, a, rt, ri, m, $6 FROM unnest($1::text[], $2::bigint[], $3::text[], $4::bigint[], $5::text[])"
        " WITH ORDINALITY AS t(k, a, rt, ri, m, n) ORDER BY n RETURNING id",
        [x.kind for x in specs], [x.account_id for x in specs], [x.ref_type for x in specs],
        [x.ref_id for x in specs], [x.memo for x in specs], now)
    ids = [r["id"] for r in rows]
    await conn.executemany(
        "INSERT INTO postings (transfer_id, ledger_account_id, amount) VALUES ($1, $2, $3)",
        [(transfer_id, book, amount) for transfer_id, spec in zip(ids, specs) for book, amount in spec.postings
         if amount != 0])
    return ids


async def place_hold(conn: asyncpg.Connection, *, account_id: int, amount: int, now: datetime,
                     ref_type: str, ref_id: int) -> None:
    """Move `amount` from available to held. Locks the available book first, so concurrent holds of
    one account queue up and each sees the balance the previous one left."""
    # One query locks the account's books and reads them, so concurrent holds queue here.
    rows = await conn.fetch("SELECT id, kind, balance FROM ledger_accounts WHERE account_id = $1 ORDER BY id"
                            " FOR UPDATE", account_id)
    by_kind = {r["kind"]: r for r in rows}
    available = by_kind["available"]["balance"]
    if available < amount:
        raise InsufficientFunds(needed=format_money(amount), available=format_money(available))
    await post_transfer(conn, kind="hold", account_id=account_id, now=now, ref_type=ref_type, ref_id=ref_id,
                        postings=[(by_kind["available"]["id"], -amount), (by_kind["held"]["id"], amount)])


async def release_hold(conn: asyncpg.Connection, *, account_id: int, amount: int, now: datetime,
                       ref_type: str, ref_id: int, kind: str = "release") -> None:
    if amount == 0:
        return
    books = await books_of(conn, account_id)
    await post_transfer(conn, kind=kind, account_id=account_id, now=now, ref_type=ref_type, ref_id=ref_id,
                        postings=[(books.held, -amount), (books.available, amount)])


async def balances(conn: asyncpg.Connection | asyncpg.Pool, account_id: int) -> dict[str, int]:
    rows = await conn.fetch("SELECT kind, balance FROM ledger_accounts WHERE account_id = $1", account_id)
    return {r["kind"]: r["balance"] for r in rows}
