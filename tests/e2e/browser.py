"""Headless Chromium (Debian's `chromium`) driven over the DevTools protocol: the one way the tests
load the web page (no playwright, no driver download)."""
from __future__ import annotations

import asyncio
import itertools
import json
import shutil
import subprocess
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class Page:
    def __init__(self, cdp: Any) -> None:
        self.cdp = cdp
        self.ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict:
        msg_id = next(self.ids)
        await self.cdp.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.cdp.recv())
            if reply.get("id") == msg_id:
                return reply.get("result", {})

    async def evaluate(self, expression: str) -> Any:
        return (await self.call("Runtime.evaluate", expression=expression, returnByValue=True))["result"].get("value")

    async def wait_for(self, expression: str, timeout: float) -> bool:
        """Poll the JS expression until it holds or `timeout` seconds pass; whether it held."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if await self.evaluate(expression):
                return True
            await asyncio.sleep(0.25)
        return bool(await self.evaluate(expression))


@asynccontextmanager
async def chromium_page(profile: Path, timeout: float = 30) -> AsyncIterator[Page]:
    """A headless Chromium with one blank page, stopped on exit."""
    import httpx
    import websockets

    proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                             "--mute-audio", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
                             "--window-size=1400,820", "--remote-debugging-port=0", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while not port_file.exists() or not port_file.read_text().strip():
            assert time.monotonic() < deadline, "chromium did not start"
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with httpx.AsyncClient() as http:
            targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        target = next(t for t in targets if t["type"] == "page")
        async with websockets.connect(target["webSocketDebuggerUrl"], max_size=2 ** 26) as cdp:
            page = Page(cdp)
            await page.call("Page.enable")
            yield page
    finally:
        proc.terminate()
        proc.wait(10)
