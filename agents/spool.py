"""A durable on-disk spool of sequenced meter reports, so that a network outage loses no samples.

Format (one directory):

- ``reports/<seq, 20 digits>.json``: one meter report per file, the exchange's own
  :class:`~exchange.metering.schemas.MeterReport`, exactly the body that is sent (a report from an
  older agent, ``ts`` spelled with microseconds, reads the same). Written to ``.<name>.tmp``, fsynced, renamed into place, then the directory is
  fsynced: a report is either whole on disk or absent, and ``append`` returns only once it is
  durable. Zero-padded names sort in sequence order.
- ``spool-state.json``: the highest acknowledged sequence, a floor for the next sequence and the
  count of reports dropped so far; replaced atomically the same way.

Sequence numbers never repeat: the next one is above every report file, every acknowledged
sequence and the recorded floor, so a restarted agent continues where it stopped.

Crash safety: leftover ``*.tmp`` files (a crash mid-write) are deleted on open; a report file that
does not decode (a torn write on a filesystem without rename ordering, a disk fault) is deleted and
counted as dropped when it is reached, never blocking the reports behind it; files at or below the
acknowledged sequence (a crash between recording an ack and deleting) are deleted on open.

Bound: at most ``max_reports`` files and ``max_bytes`` bytes. When an append goes over either, the
*oldest* pending reports are dropped and counted (``dropped``). Why oldest: during a long outage
the exchange stops billing a silent host at its last report and ends its leases after a grace
period (SPEC §5), so the newest readings are the ones that still settle live leases and show the
host's current health; the defaults (24 h of 5-second batches, 256 MiB) cover any outage shorter
than those grace periods with room to spare.

Not thread-safe: the agent uses one spool from its event loop thread only.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import msgspec

from exchange.metering.schemas import MeterReport, MeterSample

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_REPORTS", "MeterSpool", "SpoolState", "write_file_durably"]

log = logging.getLogger("gpux.agent.spool")

DEFAULT_MAX_REPORTS = 17_280  # 24 h of 5-second batches
DEFAULT_MAX_BYTES = 256 * 1024 * 1024

_REPORT_NAME = re.compile(r"^(\d{20})\.json$")
_STATE_NAME = "spool-state.json"
_REPORTS_DIR = "reports"


class SpoolState(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the spool keeps beside its report files."""

    acked_through: int = 0
    next_seq: int = 1
    dropped: int = 0


_json_encoder = msgspec.json.Encoder()
_report_decoder = msgspec.json.Decoder(MeterReport)
_state_decoder = msgspec.json.Decoder(SpoolState)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_durably(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Whole file or nothing at ``path``, on disk when this returns, with permissions ``mode``."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)  # the umask may have narrowed it
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class MeterSpool:
    """Sequenced meter reports waiting for the exchange's acknowledgement."""

    def __init__(self, directory: str | os.PathLike[str], *, max_reports: int = DEFAULT_MAX_REPORTS,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        if max_reports < 1 or max_bytes < 1:
            raise ValueError("a spool must hold at least one report")
        self._dir = Path(directory)
        self._reports_dir = self._dir / _REPORTS_DIR
        self._reports_dir.mkdir(parents=True, exist_ok=True)
        self._max_reports = max_reports
        self._max_bytes = max_bytes
        state = self._load_state()
        self._acked_through = state.acked_through
        self._dropped = state.dropped
        self._sizes: dict[int, int] = {}  # pending seq -> file size, in sequence order
        self._recover()
        newest_file = max(self._sizes, default=0)
        self._next_seq = max(state.next_seq, self._acked_through + 1, newest_file + 1)

    # -- public

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def acked_through(self) -> int:
        return self._acked_through

    @property
    def dropped(self) -> int:
        """Reports lost to the size bound or to corruption, since the spool was created."""
        return self._dropped

    @property
    def pending_bytes(self) -> int:
        return sum(self._sizes.values())

    def __len__(self) -> int:
        return len(self._sizes)

    def append(self, samples: Sequence[MeterSample]) -> MeterReport:
        """Give ``samples`` the next sequence number and store them durably."""
        report = MeterReport(seq=self._next_seq, samples=list(samples))
        body = _json_encoder.encode(report)
        write_file_durably(self._report_path(report.seq), body)
        self._next_seq += 1
        self._sizes[report.seq] = len(body)
        self._enforce_bounds()
        return report

    def pending(self) -> Iterator[MeterReport]:
        """Unacknowledged reports, oldest first. Acking while iterating is fine."""
        for seq in list(self._sizes):
            if seq not in self._sizes:
                continue  # acked or dropped meanwhile
            report = self._read(seq)
            if report is not None:
                yield report

    def ack(self, up_to_seq: int) -> int:
        """The exchange has every report up to ``up_to_seq``: forget them. Returns how many went.

        Acking beyond the newest report also moves the next sequence past it (the exchange knows
        of sequences this spool never wrote, e.g. after the data dir was lost)."""
        if up_to_seq <= self._acked_through:
            return 0
        self._acked_through = up_to_seq
        self._next_seq = max(self._next_seq, up_to_seq + 1)
        self._save_state()  # first: a crash before the deletes must not resend acked reports
        gone = [seq for seq in self._sizes if seq <= up_to_seq]
        for seq in gone:
            self._unlink(seq)
        return len(gone)

    # -- internals

    def _report_path(self, seq: int) -> Path:
        return self._reports_dir / f"{seq:020d}.json"

    def _load_state(self) -> SpoolState:
        path = self._dir / _STATE_NAME
        try:
            return _state_decoder.decode(path.read_bytes())
        except FileNotFoundError:
            return SpoolState()
        except (OSError, msgspec.DecodeError) as error:
            # Losing it only risks resending acked reports (the exchange dedupes by sequence).
            log.error("spool state %s unreadable (%s); rebuilding it from the report files", path, error)
            return SpoolState()

    def _save_state(self) -> None:
        state = SpoolState(acked_through=self._acked_through, next_seq=self._next_seq, dropped=self._dropped)
        write_file_durably(self._dir / _STATE_NAME, _json_encoder.encode(state))

    def _recover(self) -> None:
        found: list[tuple[int, int]] = []
        for entry in os.scandir(self._reports_dir):
            if entry.name.endswith(".tmp"):
                os.unlink(entry.path)  # a write that never completed
                continue
            match = _REPORT_NAME.match(entry.name)
            if match is None:
                log.warning("spool: ignoring stray file %s", entry.path)
                continue
            seq = int(match[1])
            if seq <= self._acked_through:
                os.unlink(entry.path)  # acked, deletion interrupted
                continue
            found.append((seq, entry.stat().st_size))
        self._sizes = dict(sorted(found))

    def _read(self, seq: int) -> MeterReport | None:
        try:
            report = _report_decoder.decode(self._report_path(seq).read_bytes())
        except (OSError, msgspec.DecodeError) as error:
            self._drop(seq, f"unreadable ({error})")
            return None
        if report.seq != seq:
            self._drop(seq, f"holds sequence {report.seq}")
            return None
        return report

    def _enforce_bounds(self) -> None:
        total = self.pending_bytes
        dropped = 0
        while len(self._sizes) > 1 and (len(self._sizes) > self._max_reports or total > self._max_bytes):
            oldest = next(iter(self._sizes))
            total -= self._sizes[oldest]
            self._unlink(oldest)
            dropped += 1
        if dropped:
            self._dropped += dropped
            self._save_state()
            log.warning("spool full: dropped the %d oldest report(s) (%d dropped in all)", dropped, self._dropped)

    def _drop(self, seq: int, reason: str) -> None:
        log.error("spool: dropping report %d: %s", seq, reason)
        self._unlink(seq)
        self._dropped += 1
        self._save_state()

    def _unlink(self, seq: int) -> None:
        self._sizes.pop(seq, None)
        try:
            os.unlink(self._report_path(seq))
        except FileNotFoundError:
            pass
