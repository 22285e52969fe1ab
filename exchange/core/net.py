"""Small helpers for addresses and local servers: database URLs, free ports, waiting for `gpux serve`
(the demo, the benches, the tests)."""
from __future__ import annotations

import re
import socket
import subprocess
import time
from collections.abc import Callable


def with_database(url: str, name: str) -> str:
    """The same PostgreSQL server's URL pointing at another database (socket and TCP URLs alike)."""
    return re.sub(r"^(postgres(?:ql)?://[^/]*/)([^?]*)", lambda m: m.group(1) + name, url, count=1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_healthy(base_url: str, proc: subprocess.Popen, timeout: float = 120,
                 details: Callable[[], str] = str) -> None:
    """Wait until the `gpux serve` process `proc` answers `GET /healthz` with 200.  Raises
    RuntimeError, with `details()` (e.g. the tail of its log), when it exits first or does not
    answer within `timeout` seconds."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gpux serve exited with {proc.returncode}:\n{details()}")
        try:
            if httpx.get(base_url + "/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"gpux serve did not become ready in {timeout:.0f} s:\n{details()}")
