"""Small helpers for addresses: database URLs and local ports (the demo, the benches, the tests)."""
from __future__ import annotations

import re
import socket


def with_database(url: str, name: str) -> str:
    """The same PostgreSQL server's URL pointing at another database (socket and TCP URLs alike)."""
    return re.sub(r"^(postgres(?:ql)?://[^/]*/)([^?]*)", lambda m: m.group(1) + name, url, count=1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
