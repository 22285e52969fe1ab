"""Lease hooks: their environment, output capture, failures and timeouts."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agents.hooks import hook_environment, run_hook

UUIDS = ["GPU-aaaaaaaa-0000-0000-0000-000000000000", "GPU-bbbbbbbb-0000-0000-0000-000000000000"]


def test_hook_environment_carries_the_lease() -> None:
    env = hook_environment("lease_start", "L-7", UUIDS, base_env={"PATH": "/bin", "CUDA_VISIBLE_DEVICES": "0"})

    assert env == {
        "PATH": "/bin",
        "GPUX_EVENT": "lease_start",
        "GPUX_LEASE_ID": "L-7",
        "GPUX_GPU_UUIDS": ",".join(UUIDS),
        "CUDA_VISIBLE_DEVICES": ",".join(UUIDS),
    }


async def test_a_hook_sees_the_lease_in_its_environment() -> None:
    result = await run_hook('echo "$GPUX_EVENT $GPUX_LEASE_ID $GPUX_GPU_UUIDS $CUDA_VISIBLE_DEVICES"',
                            event="lease_end", lease_id="L-1", gpu_uuids=UUIDS, timeout_s=10)

    joined = ",".join(UUIDS)
    assert result.ok
    assert result.exit_code == 0
    assert result.output == f"lease_end L-1 {joined} {joined}\n"
    assert (result.event, result.lease_id) == ("lease_end", "L-1")


async def test_a_failing_hook_is_reported_not_raised() -> None:
    result = await run_hook("echo to-stdout; echo to-stderr >&2; exit 3", event="lease_start", lease_id="L-2",
                            gpu_uuids=UUIDS, timeout_s=10)

    assert not result.ok
    assert result.exit_code == 3
    assert "to-stdout" in result.output and "to-stderr" in result.output


async def test_a_missing_command_is_a_failed_result() -> None:
    result = await run_hook("/nonexistent/gpux-hook", event="lease_start", lease_id="L-3", gpu_uuids=UUIDS,
                            timeout_s=10)

    assert result.exit_code == 127
    assert not result.ok


async def test_a_hanging_hook_is_killed_at_its_timeout(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    started = time.monotonic()

    result = await run_hook(f"echo begun; sleep 30; touch {marker}", event="lease_start", lease_id="L-4",
                            gpu_uuids=UUIDS, timeout_s=0.3)

    assert result.timed_out and result.exit_code is None and not result.ok
    assert result.output == "begun\n"
    assert time.monotonic() - started < 5
    await asyncio.sleep(0.2)
    assert not marker.exists()


async def test_a_hook_output_keeps_only_its_tail() -> None:
    result = await run_hook("seq 1 100000", event="lease_end", lease_id="L-5", gpu_uuids=UUIDS, timeout_s=10,
                            output_limit=100)

    assert result.ok
    assert result.output_truncated
    assert len(result.output) == 100
    assert result.output.endswith("99999\n100000\n")


async def test_cancelling_a_hook_kills_it(tmp_path: Path) -> None:
    marker = tmp_path / "survived"
    task = asyncio.create_task(run_hook(f"sleep 0.5; touch {marker}", event="lease_start", lease_id="L-6",
                                        gpu_uuids=UUIDS, timeout_s=10))
    await asyncio.sleep(0.1)

    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0.7)

    assert task.cancelled()
    assert not marker.exists()
