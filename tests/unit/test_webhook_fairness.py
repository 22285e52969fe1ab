"""The order a delivery pass starts webhooks in: accounts in turn, so one account's many webhooks
never come all before another's one."""
from __future__ import annotations

from exchange.webhooks.delivery import backoff_s, fair_order


def test_accounts_take_turns_and_the_first_rotates() -> None:
    rows = [(1, 10), (2, 10), (3, 10), (4, 10), (5, 20), (6, 30), (7, 30)]
    assert fair_order(rows, 0) == [(1, 10), (5, 20), (6, 30), (2, 10), (7, 30), (3, 10), (4, 10)]
    assert fair_order(rows, 1) == [(5, 20), (6, 30), (1, 10), (7, 30), (2, 10), (3, 10), (4, 10)]
    assert fair_order(rows, 2)[0] == (6, 30) and fair_order(rows, 3) == fair_order(rows, 0)
    assert sorted(fair_order(rows, 5)) == sorted(rows) and fair_order([], 3) == []


def test_backoff_doubles_up_to_its_bound() -> None:
    assert [backoff_s(n, 1, 10) for n in (1, 2, 3, 4, 5, 100)] == [1, 2, 4, 8, 10, 10]
