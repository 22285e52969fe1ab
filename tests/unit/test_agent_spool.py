"""The meter spool: sequencing, acknowledgement, restarts, bounds and torn files."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from agents.spool import MeterSpool
from exchange.metering.schemas import MeterSample


def sample(n: int) -> MeterSample:
    return MeterSample(uuid="GPU-aaaaaaaa", ts=datetime(2025, 1, 1, 0, 0, n % 60, tzinfo=UTC), util=n % 101,
                       mem_used_mb=n, power_mw=70_000 + n, energy_mj=1_000_000 + n, temp_c=40, healthy=True)


def seqs(spool: MeterSpool) -> list[int]:
    return [report.seq for report in spool.pending()]


def test_append_assigns_consecutive_sequences_and_keeps_samples(tmp_path: Path) -> None:
    spool = MeterSpool(tmp_path)

    reports = [spool.append([sample(i), sample(i + 100)]) for i in range(3)]

    assert [r.seq for r in reports] == [1, 2, 3]
    assert list(spool.pending()) == reports
    assert len(spool) == 3 and spool.next_seq == 4


def test_ack_drops_reports_up_to_the_sequence(tmp_path: Path) -> None:
    spool = MeterSpool(tmp_path)
    for i in range(5):
        spool.append([sample(i)])

    gone = spool.ack(3)

    assert gone == 3
    assert seqs(spool) == [4, 5]
    assert spool.ack(2) == 0  # acking the past again changes nothing
    assert seqs(spool) == [4, 5]


def test_acking_while_iterating_pending_is_safe(tmp_path: Path) -> None:
    spool = MeterSpool(tmp_path)
    for i in range(4):
        spool.append([sample(i)])

    seen = []
    for report in spool.pending():
        seen.append(report.seq)
        spool.ack(report.seq)

    assert seen == [1, 2, 3, 4]
    assert len(spool) == 0


def test_a_restarted_spool_keeps_pending_reports_and_continues_the_sequence(tmp_path: Path) -> None:
    first = MeterSpool(tmp_path)
    for i in range(4):
        first.append([sample(i)])
    first.ack(2)

    second = MeterSpool(tmp_path)

    assert seqs(second) == [3, 4]
    assert second.append([sample(9)]).seq == 5


def test_a_fully_acked_spool_never_reuses_a_sequence_after_restart(tmp_path: Path) -> None:
    first = MeterSpool(tmp_path)
    for i in range(3):
        first.append([sample(i)])
    first.ack(3)

    second = MeterSpool(tmp_path)

    assert len(second) == 0
    assert second.append([sample(0)]).seq == 4


def test_acking_past_the_newest_report_moves_the_sequence_on(tmp_path: Path) -> None:
    spool = MeterSpool(tmp_path)
    spool.append([sample(0)])

    spool.ack(41)  # the exchange knows sequences this spool never wrote (lost data dir)

    assert spool.append([sample(1)]).seq == 42
    assert MeterSpool(tmp_path).next_seq == 43


def test_a_torn_temp_file_from_a_crash_is_ignored_and_removed(tmp_path: Path) -> None:
    spool = MeterSpool(tmp_path)
    spool.append([sample(0)])
    torn = tmp_path / "reports" / f".{2:020d}.json.tmp"
    torn.write_bytes(b'{"seq":2,"samples":[{"uuid":"GPU-a","ts":')

    restarted = MeterSpool(tmp_path)

    assert seqs(restarted) == [1]
    assert not torn.exists()
    assert restarted.append([sample(1)]).seq == 2


def test_a_corrupt_report_is_dropped_without_blocking_the_ones_behind_it(tmp_path: Path) -> None:
    spool = MeterSpool(tmp_path)
    for i in range(3):
        spool.append([sample(i)])
    (tmp_path / "reports" / f"{2:020d}.json").write_bytes(b'{"seq":2,"samples":[{"uu')

    restarted = MeterSpool(tmp_path)

    assert seqs(restarted) == [1, 3]
    assert restarted.dropped == 1
    assert restarted.append([sample(3)]).seq == 4  # the corrupt file's sequence is not reused


def test_a_crash_between_ack_and_delete_does_not_resend_acked_reports(tmp_path: Path) -> None:
    spool = MeterSpool(tmp_path)
    for i in range(3):
        spool.append([sample(i)])
    kept = (tmp_path / "reports" / f"{1:020d}.json").read_bytes()
    spool.ack(2)
    (tmp_path / "reports" / f"{1:020d}.json").write_bytes(kept)  # as if the delete never happened

    assert seqs(MeterSpool(tmp_path)) == [3]


def test_an_unreadable_state_file_is_rebuilt_from_the_reports(tmp_path: Path) -> None:
    spool = MeterSpool(tmp_path)
    for i in range(3):
        spool.append([sample(i)])
    (tmp_path / "spool-state.json").write_bytes(b"\x00garbage")

    restarted = MeterSpool(tmp_path)

    assert seqs(restarted) == [1, 2, 3]
    assert restarted.next_seq == 4


def test_over_the_report_bound_the_oldest_are_dropped_and_counted(tmp_path: Path) -> None:
    spool = MeterSpool(tmp_path, max_reports=3)

    for i in range(5):
        spool.append([sample(i)])

    assert seqs(spool) == [3, 4, 5]
    assert spool.dropped == 2
    assert MeterSpool(tmp_path, max_reports=3).dropped == 2


def test_over_the_byte_bound_the_oldest_are_dropped_but_never_the_newest(tmp_path: Path) -> None:
    spool = MeterSpool(tmp_path, max_bytes=1)

    spool.append([sample(0)])
    spool.append([sample(1)])

    assert seqs(spool) == [2]
    assert spool.dropped == 1


def test_a_spool_must_hold_something(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        MeterSpool(tmp_path, max_reports=0)


def test_a_report_spooled_by_an_older_agent_reads_back_as_the_exchanges_struct(tmp_path: Path) -> None:
    """Agents before the move onto the client spelled ts with microseconds: an upgrade must still
    send what it left spooled."""
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / f"{4:020d}.json").write_bytes(
        b'{"seq":4,"samples":[{"uuid":"GPU-aaaaaaaa","ts":"2025-01-01T00:00:07.000000Z","util":7,'
        b'"mem_used_mb":7,"power_mw":70007,"energy_mj":1000007,"temp_c":40,"healthy":true}]}')

    spool = MeterSpool(tmp_path)

    assert [(r.seq, r.samples) for r in spool.pending()] == [(4, [sample(7)])]
    assert spool.dropped == 0 and spool.next_seq == 5
