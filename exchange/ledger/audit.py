"""`gpux audit`: the ledger's invariants, checked against the database itself."""
from __future__ import annotations

import asyncpg

CHECKS: list[tuple[str, str]] = [
    ("every transfer sums to zero",
     "SELECT transfer_id, sum(amount) AS total FROM postings GROUP BY transfer_id HAVING sum(amount) <> 0"),
    ("no negative balance outside the world book",
     "SELECT id, account_id, kind, balance FROM ledger_accounts WHERE NOT may_go_negative AND balance < 0"),
    ("each balance equals the sum of its postings",
     "SELECT la.id, la.kind, la.balance, coalesce(p.total, 0) AS postings_total FROM ledger_accounts la"
     " LEFT JOIN (SELECT ledger_account_id, sum(amount) AS total FROM postings GROUP BY ledger_account_id) p"
     " ON p.ledger_account_id = la.id WHERE la.balance <> coalesce(p.total, 0)"),
    ("all books together sum to zero",
     "SELECT sum(balance) AS total FROM ledger_accounts HAVING sum(balance) <> 0"),
    ("held funds equal what open orders and leases reserve",
     "SELECT la.account_id, la.balance AS held, coalesce(r.reserved, 0) AS reserved FROM ledger_accounts la"
     " LEFT JOIN reservations r ON r.account_id = la.account_id"
     " WHERE la.kind = 'held' AND la.balance <> coalesce(r.reserved, 0)"),
    ("no reservation without a held book covering it",
     "SELECT r.account_id, r.reserved FROM reservations r LEFT JOIN ledger_accounts la"
     " ON la.account_id = r.account_id AND la.kind = 'held' WHERE la.id IS NULL AND r.reserved <> 0"),
]


async def run_audit(conn: asyncpg.Connection) -> list[tuple[str, list[dict]]]:
    """Returns the breached checks with their offending rows; empty when the ledger is sound.
    Runs in one repeatable-read snapshot so that concurrent traffic cannot fake a breach."""
    breaches: list[tuple[str, list[dict]]] = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        for name, sql in CHECKS:
            rows = await conn.fetch(sql)
            if rows:
                breaches.append((name, [dict(r) for r in rows[:20]]))
    return breaches


def format_report(breaches: list[tuple[str, list[dict]]]) -> str:
    if not breaches:
        return f"ledger audit passed: {len(CHECKS)} checks"
    lines = [f"ledger audit FAILED: {len(breaches)} of {len(CHECKS)} checks breached"]
    for name, rows in breaches:
        lines.append(f"- {name}:")
        lines.extend(f"    {row}" for row in rows)
    return "\n".join(lines)
