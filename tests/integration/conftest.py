"""Fixtures of the integration tests: a market scenario on a fresh database (tests/integration/scenario.py)."""
from __future__ import annotations

import pytest

from tests.integration.scenario import Scenario


@pytest.fixture
async def s(db_url: str):
    """A scenario with no exchange fee (a test that wants one defines its own `s`)."""
    scenario = await Scenario.create(db_url, fee_bps=0)
    yield scenario
    await scenario.close()
