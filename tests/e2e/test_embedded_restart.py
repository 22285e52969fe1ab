"""Must-show 2: `gpux serve` with no DATABASE_URL on an empty GPUX_HOME runs on the embedded
PostgreSQL, and keeps every account, offer and bid across a stop and a start."""
from __future__ import annotations

import stat

import httpx

from tests.e2e.client import Api, in_hours
from tests.support import start_server

METRICS_TOKEN = "gpx_test_metrics_token_embedded"


async def test_embedded_server_starts_and_keeps_data_across_restart(tmp_path) -> None:
    home = tmp_path / "gpux-home"
    first = start_server(tmp_path, database_url=None, home=home, admin_key=None,
                         extra_env={"GPUX_METRICS_TOKEN": METRICS_TOKEN})
    try:
        # Arrange: no GPUX_ADMIN_KEY, so the first start generated one, saved with mode 0600.
        key_file = home / "admin.key"
        admin_key = key_file.read_text().strip()
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert first.log().count(admin_key) == 1
        assert httpx.get(first.base_url + "/schema/openapi.json").status_code == 200
        assert "gpux_bids_placed_total" in httpx.get(first.base_url + "/metrics",
                                                     headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
        async with Api(first.base_url, admin_key) as admin:
            owner = await admin.new_account("owner")
            host, _ = await owner.new_host(gpus=4)
            offer = await owner.ok("POST", "/v1/offers", 201, json={
                "host_id": host["id"], "gpus": 4, "floor_price": "1.25", "available_until": in_hours(48)})
            tenant = await admin.new_account("tenant", deposit="100.00")
            bid = await tenant.ok("POST", "/v1/bids", 201, json={
                "market": "H100-80GB/firm", "gpus": 4, "duration_s": 3600, "limit_price": "1.50",
                "client_order_id": "persist-1"})
            tenant_key, owner_key = tenant.key, owner.key
    finally:
        first.stop()

    # Act: start again on the same home.
    second = start_server(tmp_path, database_url=None, home=home, admin_key=None)
    try:
        async with Api(second.base_url, admin_key) as admin:
            tenant = admin.as_key(tenant_key)
            owner = admin.as_key(owner_key)
            bid_again = await tenant.ok("GET", f"/v1/bids/{bid['id']}")
            offers = await owner.ok("GET", "/v1/offers")
            balance = await tenant.ok("GET", "/v1/accounts/me/balance")
        # Assert: the key was not printed again, and everything is there.
        assert admin_key not in second.log()
        assert bid_again["status"] == "open" and bid_again["client_order_id"] == "persist-1"
        assert [o["id"] for o in offers["items"]] == [offer["id"]]
        assert balance == {"available": "94.00", "held": "6.00"}
    finally:
        second.stop()
