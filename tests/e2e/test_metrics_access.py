"""/metrics carries business counters (bids, fills, money settled): a bearer token, GPUX_METRICS_TOKEN
or the admin key, is needed to read it; /healthz stays public."""
from __future__ import annotations

import httpx
import pytest

from tests.conftest import create_database
from tests.support import ADMIN_KEY, start_server

TOKEN = "gpx_test_metrics_token_0123456789"


@pytest.fixture(scope="module")
async def metrics_server(tmp_path_factory, pg_server_url: str, template_db: str):
    db = await create_database(pg_server_url, template_db)
    proc = start_server(tmp_path_factory.mktemp("metrics"), database_url=db, extra_env={"GPUX_METRICS_TOKEN": TOKEN})
    yield proc
    proc.stop()


def _assert_refused(response: httpx.Response) -> None:
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"
    assert "gpux_" not in response.text
    assert response.headers["www-authenticate"].startswith("Bearer")


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong-token"}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"},
    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN},
], ids=["none", "wrong", "basic", "empty", "longer", "no-scheme"])
def test_metrics_without_the_token_is_refused_in_the_error_shape(metrics_server, headers) -> None:
    _assert_refused(httpx.get(metrics_server.base_url + "/metrics", headers=headers))


@pytest.mark.parametrize("authorization", [f"Bearer {TOKEN}", f"bearer  {TOKEN}", f"Bearer {ADMIN_KEY}"],
                         ids=["token", "lowercase-spaces", "admin-key"])
def test_metrics_with_the_token_or_the_admin_key_is_served(metrics_server, authorization) -> None:
    response = httpx.get(metrics_server.base_url + "/metrics", headers={"Authorization": authorization})
    assert response.status_code == 200, response.text
    assert "gpux_bids_placed_total" in response.text


def test_healthz_stays_public(metrics_server) -> None:
    response = httpx.get(metrics_server.base_url + "/healthz")
    assert response.status_code == 200 and response.json()["status"] == "ok"


async def test_metrics_is_closed_when_no_token_is_configured(tmp_path, pg_server_url: str, template_db: str) -> None:
    db = await create_database(pg_server_url, template_db)
    server = start_server(tmp_path, database_url=db, admin_key=None)  # generated admin key, no metrics token
    try:
        response = httpx.get(server.base_url + "/metrics")
        _assert_refused(response)
        assert "GPUX_METRICS_TOKEN" in response.json()["error"]["message"]
        assert httpx.get(server.base_url + "/healthz").status_code == 200
    finally:
        server.stop()
