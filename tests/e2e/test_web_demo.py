"""The page as a trader sees it: headless Chromium against a running `gpux demo` (simulated hosts,
tenants bidding, an owner reclaiming), not seeded rows. For both markets the header (last, change,
indicative, bid/ask, volume, risk, utilisation), the book, the trades and (spot) the preemptions fill
within a few seconds of loading; the URL's fragment selects the market and a reload keeps it."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from exchange.core.net import free_port
from tests.e2e.browser import CHROMIUM, chromium_page
from tests.support import postgres_pids, processes_using

# Each header field as the page writes it once the ticker has a value (not the placeholder "–").
FILLED = {
    "last": "document.getElementById('t-last').textContent.startsWith('$')",
    "change": "/^-?\\d+\\.\\d+ \\(/.test(document.getElementById('t-change').textContent)",
    "indicative": "document.getElementById('t-ind').textContent.startsWith('$')",
    "bid/ask": "/\\d/.test(document.getElementById('t-bidask').textContent)",
    "volume": "/^\\d+\\.\\d GPU-h$/.test(document.getElementById('t-vol').textContent)",
    "risk": "/^\\d+\\.\\d% · \\d+\\.\\d{3}\\/h$/.test(document.getElementById('t-risk').textContent)",
    "utilisation": "/^\\d+ \\/ [1-9]\\d*/.test(document.getElementById('t-util').textContent)",
    "book": "+(document.body.dataset.book || 0) >= 1",
    "trades": "document.querySelectorAll('#trades tr').length >= 1",
}
PREEMPTIONS = "document.querySelectorAll('#preemptions tr td:not(.muted)').length >= 1"
SEEN = ("JSON.stringify({market: document.body.dataset.market, hash: location.hash, conn: document.getElementById('conn')"
        ".textContent, header: [...document.querySelectorAll('header b')].map((b) => b.textContent),"
        " book: document.body.dataset.book, trades: document.querySelectorAll('#trades tr').length,"
        " preemptions: document.getElementById('preemptions').textContent.slice(0, 200)})")


def _all(checks: list[str]) -> str:
    return " && ".join(f"({c})" for c in checks)


async def _market_has_run(base: str, market: str, preemptions: bool) -> bool:
    model, tier = market.split("/")
    async with httpx.AsyncClient(base_url=base) as http:
        listed = (await http.get(f"/v1/markets/{model}/{tier}/trades")).json()
    return bool(listed["items"]) and (bool(listed["preemptions"]) or not preemptions)


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (`make test` installs it)")
async def test_the_page_fills_for_both_markets_of_a_running_demo(tmp_path: Path) -> None:
    # Arrange: `gpux demo` on its own embedded PostgreSQL, long enough for trades in both markets and
    # an owner's reclaim to preempt spot leases (its first reclaim comes after 10 s, with 15 s notice).
    home, port = tmp_path / "demo", free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "GPUX_ADMIN_KEY")}
    demo = subprocess.Popen([sys.executable, "-m", "exchange.cli", "demo", "--seconds", "150", "--port", str(port),
                             "--home", str(home)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(demo.stdout), daemon=True)
    try:
        for line in demo.stdout:
            output.append(line)
            if "Web page:" in line:
                break
        assert f"Web page: {base}/" in "".join(output), "".join(output)
        # Keep reading its terminal output, so that a full pipe never stalls it.
        reader.start()
        # The demo's progress, read over REST: a trade in each market and a preemption in spot.
        deadline = time.monotonic() + 90
        while not (await _market_has_run(base, "H100-80GB/spot", True)
                   and await _market_has_run(base, "H100-80GB/firm", False)):
            assert time.monotonic() < deadline and demo.poll() is None, "the demo did not trade and preempt"
            await asyncio.sleep(0.5)

        async with chromium_page(tmp_path / "profile") as page:
            for market, checks in (("H100-80GB/spot", [*FILLED.values(), PREEMPTIONS]),
                                   ("H100-80GB/firm", list(FILLED.values()))):
                # Act: open the market's link; then reload the page.
                await page.call("Page.navigate", url=f"{base}/#{market}")
                ready = _all([f"document.body.dataset.market === {json.dumps(market)}", *checks])
                # Assert: everything fills within a few seconds of loading, for this market.
                assert await page.wait_for(ready, 8), (market, await page.evaluate(SEEN))
                await page.call("Page.reload")
                await page.wait_for("document.readyState === 'complete'", 8)
                assert await page.wait_for(ready, 8), ("after reload", market, await page.evaluate(SEEN))
                assert await page.evaluate("location.hash") == f"#{market}"
                assert await page.evaluate("document.getElementById('market').value") == market

            # Editing the fragment switches the market in place (the page listens for hashchange).
            await page.evaluate("location.hash = 'H100-80GB/spot'")
            assert await page.wait_for(_all(["document.body.dataset.market === 'H100-80GB/spot'",
                                             *FILLED.values()]), 8), await page.evaluate(SEEN)

            # The utilisation shown is the market's: the ticker's figures, offered GPUs counted.
            async with httpx.AsyncClient(base_url=base) as http:
                ticker = (await http.get("/v1/markets/H100-80GB/spot/ticker")).json()
            assert 0 < ticker["gpus_offered"] <= 32 and 0 <= ticker["gpus_leased"] <= 32, ticker
    finally:
        # Stop the demo as a terminal would: SIGTERM; it stops its server, agents and PostgreSQL.
        if demo.poll() is None:
            demo.send_signal(signal.SIGTERM)
        try:
            demo.wait(60)
        except subprocess.TimeoutExpired:
            demo.kill()
            demo.wait(10)
        if reader.is_alive():
            reader.join(10)  # the demo has exited: its output ends
        demo.stdout.close()

    assert demo.returncode == 128 + signal.SIGTERM, "".join(output)
    assert processes_using(home) == []
    assert postgres_pids(home / "pgdata") == []
