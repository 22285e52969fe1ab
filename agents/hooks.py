"""The owner's lease hook commands (``on_lease_start`` / ``on_lease_end``).

A hook is a shell command run by ``/bin/sh`` in its own process group with the lease in its
environment. A failing, crashing or hanging hook is the owner's problem to see in the log, never
the agent's to die of: :func:`run_hook` always returns a :class:`HookResult`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Mapping, Sequence
from typing import Literal

import msgspec

__all__ = ["HOOK_OUTPUT_LIMIT", "HookEvent", "HookResult", "hook_environment", "run_hook"]

log = logging.getLogger("gpux.agent.hooks")

HookEvent = Literal["lease_start", "lease_end"]

HOOK_OUTPUT_LIMIT = 16 * 1024
"""Bytes of output kept per run: the tail, where the error usually is."""
_PIPE_GRACE_S = 2.0


class HookResult(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    event: HookEvent
    lease_id: str
    command: str
    exit_code: int | None  # None: it never ran, or was killed at the timeout
    timed_out: bool = False
    output: str = ""  # stdout and stderr interleaved, the last HOOK_OUTPUT_LIMIT bytes
    output_truncated: bool = False
    duration_s: float = 0.0
    error: str | None = None  # why it could not be started

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.error is None


def hook_environment(event: HookEvent, lease_id: str, gpu_uuids: Sequence[str],
                     base_env: Mapping[str, str] | None = None, notice_file: str | None = None) -> dict[str, str]:
    """The agent's environment plus the lease: ``CUDA_VISIBLE_DEVICES`` takes GPU UUIDs as well
    as indices, so a hook that launches CUDA work sees exactly the lease's cards.
    ``GPUX_NOTICE_FILE`` is where the lease's interruption notice will appear (agents/notices.py):
    the file does not exist until the exchange gives notice."""
    uuids = ",".join(gpu_uuids)
    env = dict(os.environ if base_env is None else base_env)
    env.update({
        "GPUX_EVENT": event,
        "GPUX_LEASE_ID": lease_id,
        "GPUX_GPU_UUIDS": uuids,
        "CUDA_VISIBLE_DEVICES": uuids,
    })
    if notice_file is not None:
        env["GPUX_NOTICE_FILE"] = notice_file
    return env


async def _read_tail(stream: asyncio.StreamReader, limit: int) -> tuple[bytes, bool]:
    kept = bytearray()
    truncated = False
    while chunk := await stream.read(65536):
        kept += chunk
        if len(kept) > limit:
            del kept[: len(kept) - limit]
            truncated = True
    return bytes(kept), truncated


def _kill_group(process: asyncio.subprocess.Process) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the shell and whatever it started
    except ProcessLookupError:
        pass


async def run_hook(command: str, *, event: HookEvent, lease_id: str, gpu_uuids: Sequence[str],
                   timeout_s: float = 300.0, base_env: Mapping[str, str] | None = None,
                   output_limit: int = HOOK_OUTPUT_LIMIT, notice_file: str | None = None) -> HookResult:
    """Run one hook to completion or ``timeout_s``; never raises for the hook's sake.

    Cancelling the caller kills the hook's process group, then propagates the cancellation.
    """
    started = time.monotonic()
    env = hook_environment(event, lease_id, gpu_uuids, base_env, notice_file)
    try:
        process = await asyncio.create_subprocess_shell(
            command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True)
    except OSError as error:
        log.error("hook %s for lease %s could not start: %s", event, lease_id, error)
        return HookResult(event=event, lease_id=lease_id, command=command, exit_code=None,
                          error=str(error), duration_s=time.monotonic() - started)
    assert process.stdout is not None
    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation that races with
    # completion, which would leave the agent's hook worker running after shutdown.
    reader = asyncio.ensure_future(_read_tail(process.stdout, output_limit))
    timed_out = False
    try:
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(reader)
                await process.wait()
        except TimeoutError:
            timed_out = True
            _kill_group(process)
            await process.wait()
        try:
            # Normally done already; after a kill, a grandchild that left the process group may
            # still hold the pipe open: do not wait long for it.
            async with asyncio.timeout(_PIPE_GRACE_S):
                output, truncated = await asyncio.shield(reader)
        except TimeoutError:
            output, truncated = b"", True
    except BaseException:
        _kill_group(process)
        reader.cancel()
        await process.wait()  # reap it: no zombie, no unclosed transport
        raise
    finally:
        reader.cancel()
    result = HookResult(
        event=event, lease_id=lease_id, command=command,
        exit_code=None if timed_out else process.returncode, timed_out=timed_out,
        output=output.decode("utf-8", "replace"), output_truncated=truncated,
        duration_s=time.monotonic() - started)
    _log_result(result)
    return result


def _log_result(result: HookResult) -> None:
    if result.ok:
        log.info("hook %s for lease %s ok in %.1fs", result.event, result.lease_id, result.duration_s)
    elif result.timed_out:
        log.error("hook %s for lease %s killed after %.1fs; output: %s", result.event, result.lease_id,
                  result.duration_s, result.output[-2000:])
    else:
        log.error("hook %s for lease %s exited %s; output: %s", result.event, result.lease_id,
                  result.exit_code, result.output[-2000:])
