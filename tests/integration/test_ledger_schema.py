"""The ledger's rules are enforced by PostgreSQL itself, and `gpux audit` sees any breach."""
from __future__ import annotations

from datetime import datetime, timezone

import asyncpg
import pytest

from exchange.ledger import service as ledger
from exchange.ledger.audit import run_audit
from tests.support import run_audit as run_audit_cli

NOW = datetime(2026, 1, 1, tzinfo=timezone.utc)


async def _account(db: asyncpg.Connection, name: str = "t1") -> tuple[int, ledger.Books]:
    account_id = await db.fetchval(
        "INSERT INTO accounts (name, role, api_key_hash, created_at) VALUES ($1, 'tenant', $2, $3) RETURNING id",
        name, name.encode(), NOW)
    return account_id, await ledger.open_books(db, account_id)


async def test_an_unbalanced_transfer_is_refused_at_commit(db: asyncpg.Connection) -> None:
    _, books = await _account(db)

    with pytest.raises(asyncpg.CheckViolationError, match="does not sum to zero"):
        async with db.transaction():
            transfer = await db.fetchval(
                "INSERT INTO transfers (kind, created_at) VALUES ('forged', $1) RETURNING id", NOW)
            await db.execute("INSERT INTO postings (transfer_id, ledger_account_id, amount) VALUES ($1, $2, 100)",
                             transfer, books.available)

    assert await db.fetchval("SELECT balance FROM ledger_accounts WHERE id = $1", books.available) == 0


async def test_a_book_never_goes_negative(db: asyncpg.Connection) -> None:
    account_id, books = await _account(db)

    with pytest.raises(asyncpg.CheckViolationError):
        async with db.transaction():
            await ledger.post_transfer(db, kind="hold", account_id=account_id, now=NOW,
                                       postings=[(books.available, -1), (books.held, 1)])


async def test_postings_are_append_only(db: asyncpg.Connection) -> None:
    account_id, books = await _account(db)
    world = await ledger.system_book(db, "world")
    async with db.transaction():
        await ledger.post_transfer(db, kind="deposit", account_id=account_id, now=NOW,
                                   postings=[(world, -500), (books.available, 500)])

    with pytest.raises(asyncpg.RestrictViolationError):
        await db.execute("UPDATE postings SET amount = amount * 2")
    with pytest.raises(asyncpg.RestrictViolationError):
        await db.execute("DELETE FROM postings")


async def test_audit_passes_on_a_sound_ledger_and_reports_a_breach(db: asyncpg.Connection, db_url: str) -> None:
    account_id, books = await _account(db)
    world = await ledger.system_book(db, "world")
    async with db.transaction():
        await ledger.post_transfer(db, kind="deposit", account_id=account_id, now=NOW,
                                   postings=[(world, -500), (books.available, 500)])
    assert await run_audit(db) == []
    assert run_audit_cli(db_url).returncode == 0

    # A held balance that no open bid explains (written behind the ledger's back).
    await db.execute("UPDATE ledger_accounts SET balance = balance + 7 WHERE id = $1", books.held)
    breaches = dict(await run_audit(db))
    cli = run_audit_cli(db_url)

    assert "held funds equal what open orders and leases reserve" in breaches
    assert "each balance equals the sum of its postings" in breaches
    assert cli.returncode == 1 and "FAILED" in cli.stdout
