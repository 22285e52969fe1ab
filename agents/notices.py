"""Interruption notices where the workload runs.

When the exchange puts one of this host's leases under notice (the lease turns ``ending`` with an
``end_at`` and an ``end_reason``: ``reclaimed`` by the owner, ``outbid`` by a higher bid), the
agent, on the lease listing that first shows it:

- writes ``<data dir>/notices/<lease id>.json`` atomically (temp file + rename, so a reader sees
  the whole notice or none). The path is in every hook's environment as ``GPUX_NOTICE_FILE`` from
  the lease's start on, so a job can poll for the file's existence, like Mithril's signal file;
- serves the same JSON on a local HTTP endpoint (127.0.0.1 only, ``gpux agent --metadata-port``),
  modelled on AWS's ``spot/instance-action``: 404 until a notice exists.

Shape (AWS instance-action's ``action`` and ``time``, plus the lease and the reason)::

    {"lease_id": "42", "action": "terminate", "time": "2026-11-29T03:20:00Z",
     "reason": "reclaimed", "gpu_uuids": ["GPU-..."], "noticed_at": "2026-11-29T03:19:00Z"}

``time`` is when the lease ends (the GPUs go back to the owner or the higher bidder);
``noticed_at`` is when this agent first saw the notice.

The file is removed once the lease is no longer running (listed ended/failed, or not listed at
all): by then the workload is gone, and a stale file would read as a notice for a lease id that
no longer has GPUs. It is kept across agent restarts while the lease runs (rewritten identically).

Endpoints (GET only; anything else 405, unknown paths 404):

- ``/v1/leases/{lease_id}/notice``: that lease's notice, 404 until it has one;
- ``/v1/notices``: ``{"items": [...]}``, every current notice on this host (200, maybe empty);
- ``/latest/meta-data/spot/instance-action``: AWS's path and shape (``{"action","time"}``) for the
  notice that ends first on this host, 404 when none, for tools written against AWS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import msgspec

from agents.spool import write_file_durably
from agents.wire import as_sent, format_rfc3339
from exchange.leases.schemas import OwnerLease

__all__ = ["Notice", "NoticeBoard", "serve_metadata"]

log = logging.getLogger("gpux.agent.notices")

_json = msgspec.json.Encoder()
_MAX_REQUEST_BYTES = 8 * 1024  # a GET's request line and headers; more is not a metadata client
_SAFE_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_READ_TIMEOUT_S = 5.0  # a client that opens a connection and sends nothing is dropped after this


class Notice(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    lease_id: str
    action: Literal["terminate"] = "terminate"
    time: str  # RFC 3339 UTC: when the lease ends
    reason: str | None  # the exchange's end_reason: "reclaimed", "outbid", ...
    gpu_uuids: list[str]
    noticed_at: str  # RFC 3339 UTC: when the agent first saw it


class AwsInstanceAction(msgspec.Struct, frozen=True, kw_only=True):
    action: str
    time: str


class NoticeList(msgspec.Struct, frozen=True, kw_only=True):
    items: list[Notice]


_notice_decoder = msgspec.json.Decoder(Notice)


def _write_atomically(path: Path, data: bytes) -> None:
    """Whole file or nothing at ``path``. World-readable (0644): the workload may run as another
    user than the agent; a notice holds nothing secret."""
    write_file_durably(path, data, mode=0o644)


class NoticeBoard:
    """This host's current notices: one file per lease under notice, and the same in memory for
    the metadata endpoint. Only the agent's lease loop calls :meth:`update` (one writer)."""

    def __init__(self, directory: Path, clock: Callable[[], float] = time.time) -> None:
        self.directory = directory
        self._clock = clock
        directory.mkdir(parents=True, exist_ok=True)
        self._notices: dict[str, Notice] = {}
        for path in directory.glob("*.json"):  # notices written before a restart
            try:
                notice = _notice_decoder.decode(path.read_bytes())
            except (OSError, msgspec.DecodeError) as error:
                log.warning("notice file %s unreadable (%s); ignored", path, error)
                continue
            self._notices[notice.lease_id] = notice

    def path_for(self, lease_id: str) -> Path:
        return self.directory / f"{lease_id}.json"

    def get(self, lease_id: str) -> Notice | None:
        return self._notices.get(lease_id)

    def all(self) -> list[Notice]:
        return sorted(self._notices.values(), key=lambda n: (n.time, n.lease_id))

    def update(self, live: Sequence[OwnerLease]) -> list[Notice]:
        """Take the host's running leases (the latest listing); write notices that are new or
        changed, remove those of leases no longer running. Returns the notices written now."""
        written: list[Notice] = []
        running: set[str] = set()
        for lease in live:
            lease_id = str(lease.id)
            running.add(lease_id)
            if lease.status != "ending" or lease.end_at is None:
                continue
            ends_at = as_sent(lease.end_at)
            if not _SAFE_ID.fullmatch(lease_id):  # it names a file: no "/", "..", or the like
                log.error("lease id %r is not a plain name; no notice file for it", lease_id)
                continue
            known = self._notices.get(lease_id)
            if known is not None and known.time == ends_at and known.reason == lease.end_reason:
                continue
            notice = Notice(lease_id=lease_id, time=ends_at, reason=lease.end_reason,
                            gpu_uuids=list(lease.gpu_uuids),
                            noticed_at=known.noticed_at if known else format_rfc3339(self._clock()))
            try:
                _write_atomically(self.path_for(lease_id), _json.encode(notice))
            except OSError:
                log.exception("could not write the notice file of lease %s", lease_id)
            # Served even if the file could not be written: the endpoint is the second channel.
            self._notices[lease_id] = notice
            written.append(notice)
            log.warning("notice: lease %s ends at %s (%s); written to %s", lease_id, notice.time,
                        notice.reason, self.path_for(lease_id))
        for lease_id in [lid for lid in self._notices if lid not in running]:
            del self._notices[lease_id]
            with contextlib.suppress(FileNotFoundError):
                self.path_for(lease_id).unlink()
            log.info("notice of lease %s removed: the lease is no longer running", lease_id)
        return written

    def answer(self, path: str) -> tuple[int, bytes]:
        """The HTTP status and body for a GET of ``path``."""
        path = path.split("?", 1)[0]
        if path == "/v1/notices":
            return 200, _json.encode(NoticeList(items=self.all()))
        if path == "/latest/meta-data/spot/instance-action":
            notices = self.all()
            if not notices:
                return 404, _error("not_found", "no notice on this host")
            first = notices[0]
            return 200, _json.encode(AwsInstanceAction(action=first.action, time=first.time))
        parts = path.split("/")
        if len(parts) == 5 and parts[:3] == ["", "v1", "leases"] and parts[4] == "notice" and parts[3]:
            notice = self._notices.get(parts[3])
            if notice is None:
                return 404, _error("not_found", f"no notice for lease {parts[3]}")
            return 200, _json.encode(notice)
        return 404, _error("not_found", "unknown path")


def _error(code: str, message: str) -> bytes:
    return _json.encode({"error": {"code": code, "message": message}})


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed"}


async def _handle(board: NoticeBoard, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        try:
            async with asyncio.timeout(_READ_TIMEOUT_S):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[1].startswith("/"):
            status, body = 400, _error("bad_request", "malformed request line")
        elif parts[0] not in ("GET", "HEAD"):
            status, body = 405, _error("method_not_allowed", "GET only")
        else:
            status, body = board.answer(parts[1])
        headers = (f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                   + ("Allow: GET, HEAD\r\n" if status == 405 else "") + "\r\n")
        writer.write(headers.encode("latin-1") + (b"" if parts[0] == "HEAD" else body))
        with contextlib.suppress(ConnectionError):
            await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def serve_metadata(board: NoticeBoard, port: int, host: str = "127.0.0.1") -> asyncio.Server:
    """Start the local metadata endpoint (one request per connection). ``port`` 0 picks a free
    port; the bound one is logged. Loopback only: the notices are this host's business."""
    server = await asyncio.start_server(lambda r, w: _handle(board, r, w), host, port,
                                        limit=_MAX_REQUEST_BYTES)
    bound = server.sockets[0].getsockname()[1]
    log.info("notice metadata endpoint on http://%s:%d/v1/notices", host, bound)
    return server
