"""The live page at `/`, loaded by headless Chromium (Debian's `chromium`) against a running server
with trades: the page renders candles and the book from REST and the websocket feed.

GPUX_SAVE_SCREENSHOT=docs/screenshot.png also saves the screenshot there (the README's)."""
from __future__ import annotations

import asyncio
import os
import random
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import asyncpg
import pytest

from tests.e2e.browser import CHROMIUM, chromium_page
from tests.e2e.client import Api, in_hours, unique
from tests.e2e.test_feed import cross, new_market



async def backfill_history(db_url: str, market: str, minutes: int = 90) -> None:
    """Ninety minutes of earlier clearing prices (ticks and trades), so that the chart has candles to
    show without waiting ninety minutes: rows like the auction writes, on the lease of a real trade."""
    conn = await asyncpg.connect(db_url)
    try:
        lease_id = await conn.fetchval("SELECT lease_id FROM trades WHERE market = $1 ORDER BY id LIMIT 1", market)
        rng = random.Random(7)
        price = 2_000_000
        now = datetime.now(timezone.utc).replace(second=0, microsecond=0)
        for k in range(minutes, 0, -1):
            for tick in range(3):
                price = max(1_000_000, price + rng.randrange(-60_000, 61_000, 10_000))
                at = now - timedelta(minutes=k) + timedelta(seconds=5 + 20 * tick)
                gpus = rng.choice((1, 2, 4, 8))
                tick_id = await conn.fetchval(
                    "INSERT INTO market_ticks (market, at, price, indicative, volume_gpus, open_bids, state_hash)"
                    " VALUES ($1, $2, $3, $3, $4, 0, 0) RETURNING id", market, at, price, gpus)
                await conn.execute("INSERT INTO trades (market, tick_id, lease_id, price, gpus, duration_s, at)"
                                   " VALUES ($1, $2, $3, $4, $5, 3600, $6)", market, tick_id, lease_id, price, gpus, at)
    finally:
        await conn.close()


async def screenshot(url: str, path: Path, profile: Path, ready: str, timeout: float = 30) -> dict:
    """Load `url` in headless Chromium, wait until the JS expression `ready` holds, save a PNG."""
    import base64
    import json

    async with chromium_page(profile, timeout) as page:
        await page.call("Page.navigate", url=url)
        is_ready = await page.wait_for(ready, timeout)
        await asyncio.sleep(0.5)  # let the chart finish its frame
        state = await page.evaluate("JSON.stringify({candles: document.body.dataset.candles, book: document.body.dataset.book,"
                                    " canvases: document.querySelectorAll('canvas').length})")
        png = await page.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(png["data"]))
    return dict(json.loads(state), ready=is_ready)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
async def test_the_page_shows_candles_and_the_book(admin: Api, server, server_db: str, tmp_path: Path) -> None:
    # Arrange: a market with a real trade, its history, resting bids at several prices, and free GPUs
    # offered at two floors: a book with both sides.
    model, owner, host = await new_market(admin, gpus=8)
    market = f"{model}/spot"
    host2, _ = await owner.new_host(gpus=8, model=model, fabric=unique("pod"))
    await owner.ok("POST", "/v1/offers", 201, json={"host_id": host2["id"], "gpus": 8, "floor_price": "3.20",
                                                    "available_until": in_hours(24)})
    bidder = await admin.new_account("tenant", deposit="1000.00")
    for limit, gpus in (("1.90", 2), ("1.85", 4), ("1.70", 8), ("1.60", 3)):
        await bidder.ok("POST", "/v1/bids", 201, json={"market": market, "gpus": gpus, "duration_s": 3600,
                                                        "limit_price": limit, "client_order_id": unique("w")})
    await cross(admin, owner, host, model, gpus=8, delay_s=1.0)
    for _ in range(40):
        if (await admin.ok("GET", f"/v1/markets/{model}/spot/trades"))["items"]:
            break
        await asyncio.sleep(0.25)
    await backfill_history(server_db, market)
    for _ in range(40):  # the next ticks publish the book
        book = await admin.ok("GET", f"/v1/markets/{model}/spot/book")
        if len(book["bids"]) >= 4 and book["asks"]:
            break
        await asyncio.sleep(0.25)

    # Act: headless Chromium loads the page (it fetches candles over REST and the rest from the feed),
    # driven over the DevTools protocol until the page says it has drawn candles and the book.
    url = f"{server.base_url}/?market={market}&interval=1m"
    shot = tmp_path / "page.png"
    rendered = await screenshot(url, shot, tmp_path / "profile",
                                ready="+(document.body.dataset.book || 0) >= 5 && +(document.body.dataset.candles || 0) >= 60"
                                      " && document.getElementById('t-last').textContent.startsWith('$')")

    # Assert: the chart got its candles, the book its levels, the ticker its price; a real screenshot.
    assert rendered["ready"], rendered
    assert int(rendered["candles"]) >= 60 and int(rendered["book"]) >= 5 and rendered["canvases"] > 0
    assert shot.exists() and shot.stat().st_size > 20_000
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("GPUX_SAVE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["GPUX_SAVE_SCREENSHOT"])


async def test_static_files_and_the_vendored_chart_library_are_served(server) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=server.base_url) as http:
        page = await http.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "/static/app.js" in page.text
        lib = await http.get("/static/vendor/lightweight-charts/lightweight-charts.standalone.production.js")
        assert lib.status_code == 200 and len(lib.content) > 100_000
        assert (await http.get("/static/vendor/lightweight-charts/LICENSE")).status_code == 200
        assert (await http.get("/static/nope.js")).status_code == 404


async def test_the_ticker_counts_gpus_offered_and_leased_per_market(admin: Api, server) -> None:
    # Arrange: one host of 8 GPUs offered spot only, all 8 leased by a crossing; a second host offers 4
    # GPUs with a firm window open (sold in both markets), 2 of them leased firm.
    model, owner, host = await new_market(admin, gpus=8)
    host2, _ = await owner.new_host(gpus=4, model=model, fabric=unique("pod"))
    await owner.ok("POST", "/v1/offers", 201, json={"host_id": host2["id"], "gpus": 4, "floor_price": "9.00",
                                                    "available_until": in_hours(24), "firm_until": in_hours(6)})
    tenant = await cross(admin, owner, host, model, gpus=8, delay_s=1.0)
    await tenant.ok("POST", "/v1/bids", 201, json={"market": f"{model}/firm", "gpus": 2, "duration_s": 3600,
                                                    "limit_price": "9.50", "client_order_id": unique("f")})
    api = admin.as_key(None)
    for _ in range(80):
        spot = await api.ok("GET", f"/v1/markets/{model}/spot/ticker")
        firm = await api.ok("GET", f"/v1/markets/{model}/firm/ticker")
        if spot["gpus_leased"] == 8 and firm["gpus_leased"] == 2:
            break
        await asyncio.sleep(0.25)

    # Both leases exist now and nothing else moves in this model: read both tickers afresh.
    spot = await api.ok("GET", f"/v1/markets/{model}/spot/ticker")
    firm = await api.ok("GET", f"/v1/markets/{model}/firm/ticker")
    # Assert: each market counts its own leases plus the free GPUs it can still sell (its ask depth):
    # spot 8 leased of 8 + 2 free; firm 2 leased of 2 + 2 free (the GPUs leased firm are not spot's).
    assert (spot["gpus_offered"], spot["gpus_leased"]) == (10, 8), (spot, firm)
    assert (firm["gpus_offered"], firm["gpus_leased"]) == (4, 2), firm
