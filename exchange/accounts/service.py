from __future__ import annotations

import asyncpg
import msgspec

from exchange.accounts.schemas import (Account, AccountCreate, AccountCreated, Balance, Deposit, DepositCreate,
                                       LedgerEntry, LedgerPage)
from exchange.core.auth import hash_secret, new_api_key
from exchange.core import metrics
from exchange.core.context import AppContext, request_hash
from exchange.core.errors import Conflict, InvalidField, NotFound
from exchange.core.bounds import parse_cursor
from exchange.core.money import format_money, money_field
from exchange.ledger import service as ledger

_deposit_encoder = msgspec.json.Encoder()


async def create_account(ctx: AppContext, data: AccountCreate, *, api_key: str | None = None) -> AccountCreated:
    key = api_key or new_api_key()
    async with ctx.pool.acquire() as conn, conn.transaction():
        try:
            account_id = await conn.fetchval(
                "INSERT INTO accounts (name, role, api_key_hash, created_at) VALUES ($1, $2, $3, $4) RETURNING id",
                data.name, data.role, hash_secret(key), ctx.clock())
        except asyncpg.UniqueViolationError:
            raise Conflict("name_taken", f"an account named {data.name!r} exists already", field="name") from None
        await ledger.open_books(conn, account_id)
    return AccountCreated(id=account_id, name=data.name, role=data.role, api_key=key)


async def get_account(ctx: AppContext, account_id: int) -> Account:
    row = await ctx.pool.fetchrow("SELECT id, name, role, created_at FROM accounts WHERE id = $1", account_id)
    if row is None:
        raise NotFound(f"account {account_id}")
    return Account(**dict(row))


async def deposit(ctx: AppContext, account_id: int, data: DepositCreate) -> tuple[Deposit, bool]:
    """Credit an account from the world book. Returns (deposit, replayed): a retry with the same key
    and body returns the first deposit and moves nothing."""
    amount = money_field("amount", data.amount)
    if amount <= 0:
        raise InvalidField("amount", "must be greater than zero")
    fingerprint = request_hash(_deposit_encoder.encode(data))
    async with ctx.pool.acquire() as conn, conn.transaction():
        if not await conn.fetchval("SELECT 1 FROM accounts WHERE id = $1", account_id):
            raise NotFound(f"account {account_id}")
        # Serialise deposits with the same key, so two racing retries cannot both credit.
        await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, $2))", data.idempotency_key, account_id)
        existing = await conn.fetchrow(
            "SELECT id, request_hash, memo, created_at FROM transfers"
            " WHERE account_id = $1 AND kind = 'deposit' AND idempotency_key = $2", account_id, data.idempotency_key)
        if existing is not None:
            if existing["request_hash"] != fingerprint:
                raise Conflict("idempotency_conflict",
                               "this idempotency_key was used for a different deposit", field="idempotency_key")
            return Deposit(id=existing["id"], account_id=account_id, amount=existing["memo"],
                           idempotency_key=data.idempotency_key, created_at=existing["created_at"]), True
        books = await ledger.books_of(conn, account_id)
        world = await ledger.system_book(conn, "world")
        now = ctx.clock()
        try:
            transfer_id = await ledger.post_transfer(
                conn, kind="deposit", account_id=account_id, now=now, idempotency_key=data.idempotency_key,
                request_hash=fingerprint, memo=format_money(amount),
                postings=[(world, -amount), (books.available, amount)])
        except asyncpg.NumericValueOutOfRangeError:
            # Every balance is a bigint; the world book (minus all deposits) reaches its end first.
            # The transaction rolls back: nothing is credited.
            raise InvalidField("amount", "this deposit would take the exchange's books past their range"
                                         f" ({format_money(2**63 - 1)} in all)") from None
    metrics.DEPOSITS.inc()
    return Deposit(id=transfer_id, account_id=account_id, amount=format_money(amount),
                   idempotency_key=data.idempotency_key, created_at=now), False


async def balance(ctx: AppContext, account_id: int) -> Balance:
    books = await ledger.balances(ctx.pool, account_id)
    return Balance(available=format_money(books.get("available", 0)), held=format_money(books.get("held", 0)))


async def ledger_page(ctx: AppContext, account_id: int, cursor: str | None, limit: int) -> LedgerPage:
    """Newest first, keyset-paginated on the posting id."""
    before = parse_cursor(cursor)
    rows = await ctx.pool.fetch(
        "SELECT p.id, p.transfer_id, t.kind, la.kind AS book, p.amount, t.ref_type, t.ref_id, t.memo, t.created_at"
        " FROM postings p JOIN ledger_accounts la ON la.id = p.ledger_account_id"
        " JOIN transfers t ON t.id = p.transfer_id"
        " WHERE la.account_id = $1 AND p.id < $2 ORDER BY p.id DESC LIMIT $3",
        account_id, before, limit + 1)
    items = [LedgerEntry(id=r["id"], transfer_id=r["transfer_id"], kind=r["kind"], book=r["book"],
                         amount=format_money(r["amount"]), ref_type=r["ref_type"], ref_id=r["ref_id"],
                         memo=r["memo"], created_at=r["created_at"]) for r in rows[:limit]]
    return LedgerPage(items=items, next=str(items[-1].id) if len(rows) > limit else None)

