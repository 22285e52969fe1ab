"""Runs seeds: each in a fresh database cloned from one migrated template (a file copy), through the
driver, with the auditor after every step. A failing seed keeps its database for inspection and
prints its seed, the failing check and the steps that led there; `gpux sim --seed S --steps N`
replays the same steps."""
from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Callable

import asyncpg

from exchange.core.net import with_database
from exchange.db import databases
from exchange.db.databases import drop_database  # noqa: F401 (the runner's callers drop seeds' databases)
from exchange.sim.auditor import LIVENESS_MIN_STEPS, Auditor, seed_counts
from exchange.sim.driver import Driver, SimFailure
from exchange.sim.workload import START, Step, Workload

STEP_TIMEOUT_S = 60.0
# Failing seeds whose databases are kept for inspection; later failures drop theirs (a replay remakes it).
KEEP_FAILED = 5


@dataclass
class SeedResult:
    seed: int
    steps: int                                   # the workload's steps asked for (setup not counted)
    log: list[tuple[Step, str]] = field(default_factory=list)
    failure: SimFailure | None = None
    failed_at: int | None = None                 # index in `log` of the failing step
    seconds: float = 0.0
    database: str = ""                           # its database's name (dropped when the seed passed)
    database_url: str = ""
    kept: bool = False                           # its database was kept after a failure
    simulated_s: float = 0.0                     # simulated time the seed spanned
    counts: dict[str, int] = field(default_factory=dict)  # what it did (auditor.seed_counts)
    crashes: int = 0                             # crashes injected (--crash-rate)

    @property
    def ok(self) -> bool:
        return self.failure is None


async def create_template(server_url: str) -> str:
    return await databases.create_template(server_url, f"gpux_sim_template_{os.getpid()}")


async def run_seed(server_url: str, template: str, seed: int, steps: int, crash_rate: float = 0.0) -> SeedResult:
    """One seed in a new database cloned from `template`; the caller drops it (or keeps it)."""
    started = time.perf_counter()
    name = f"gpux_sim_{os.getpid()}_{seed}"
    result = SeedResult(seed=seed, steps=steps, database=name, database_url=with_database(server_url, name))
    url = await databases.clone_database(server_url, template, name)
    workload = Workload(seed)
    driver = Driver(url, workload, crash_rate=crash_rate)
    audit_conn: asyncpg.Connection | None = None
    try:
        await driver.open()
        audit_conn = await asyncpg.connect(url)
        auditor = Auditor(audit_conn, driver)
        setup = workload.setup()
        for index in range(len(setup) + steps):
            step = setup[index] if index < len(setup) else workload.next(driver.model)
            result.log.append((step, ""))
            try:
                await auditor.before_step()
                outcome = await asyncio.wait_for(driver.run(step), STEP_TIMEOUT_S)
                result.log[-1] = (step, outcome)
                await auditor.check()
            except SimFailure as failure:
                result.failure, result.failed_at = failure, index
                break
            except asyncio.TimeoutError:
                result.failure = SimFailure("every step finishes", f"no answer in {STEP_TIMEOUT_S:.0f} s (a deadlock?)")
                result.failed_at = index
                break
        else:
            try:
                await auditor.finish(liveness=steps >= LIVENESS_MIN_STEPS)
            except SimFailure as failure:
                result.failure, result.failed_at = failure, len(result.log) - 1
        result.simulated_s = (driver.clock() - START).total_seconds()
        result.counts = await seed_counts(audit_conn, driver.clock())
        result.crashes = driver.crashes
    finally:
        await driver.close()
        if audit_conn is not None:
            await audit_conn.close()
    result.seconds = time.perf_counter() - started
    return result


def format_failure(result: SeedResult, last: int = 30) -> str:
    failure = result.failure
    lines = [f"seed {result.seed} FAILED at step {result.failed_at}: {failure.check}"]
    detail = failure.detail
    if isinstance(detail, list):
        lines.extend(f"    {row}" for row in detail)
    elif detail is not None:
        lines.extend(f"    {line}" for line in str(detail).splitlines())
    start = max(0, len(result.log) - last)
    lines.append(f"  steps {start}..{len(result.log) - 1} of this seed"
                 + (f" (earlier ones: --steps {result.steps} replays all)" if start else "") + ":")
    for index in range(start, len(result.log)):
        step, outcome = result.log[index]
        mark = ">>" if index == result.failed_at else "  "
        lines.append(f"  {mark} #{index} {step} -> {outcome or '(failed)'}")
    lines.append(f"  replay: gpux sim --seed {result.seed} --steps {result.steps}")
    if result.kept:
        lines.append(f"  its database is kept: {result.database_url}")
    return "\n".join(lines)


async def run_seeds(server_url: str, first: int, steps: int, count: int, echo: Callable[[str], None], *,
                    verbose: bool = False, stop_on_failure: bool = False,
                    template: str | None = None, crash_rate: float = 0.0) -> list[SeedResult]:
    """Run seeds first .. first + count - 1; print one line per seed and a summary. `template`: a
    migrated database to clone (default: one made and dropped here)."""
    # The services log the races they handle and the breaches they see; the simulation reports them.
    logging.getLogger("exchange").setLevel(logging.CRITICAL)
    started = time.perf_counter()
    own_template = template is None
    if own_template:
        template = await create_template(server_url)
    results: list[SeedResult] = []
    # A passed seed's database is dropped while the next seed runs (a drop waits on the server's disk).
    dropping: asyncio.Task | None = None
    try:
        for seed in range(first, first + count):
            result = await run_seed(server_url, template, seed, steps, crash_rate)
            results.append(result)
            if dropping is not None:
                await dropping
                dropping = None
            result.kept = not result.ok and sum(r.kept for r in results) < KEEP_FAILED
            if not result.kept:
                dropping = asyncio.ensure_future(drop_database(server_url, result.database))
            if verbose:
                for index, (step, outcome) in enumerate(result.log):
                    echo(f"  #{index} {step} -> {outcome}")
            if result.ok:
                echo(f"seed {seed}: ok, {len(result.log)} steps in {result.seconds:.2f} s")
            else:
                echo(format_failure(result))
                if stop_on_failure:
                    break
    finally:
        if dropping is not None:
            await dropping
        if own_template:
            await drop_database(server_url, template)
    elapsed = time.perf_counter() - started
    failed = [r.seed for r in results if not r.ok]
    total_steps = sum(len(r.log) for r in results)
    hours = sum(r.simulated_s for r in results) / 3600
    totals = {name: sum(r.counts.get(name, 0) for r in results) for name in (results[0].counts if results else {})}
    echo("done: " + ", ".join(f"{value} {name}" for name, value in totals.items()))
    crashes = sum(r.crashes for r in results)
    echo(f"sim: {len(results)} seeds, {total_steps} steps, {hours:.1f} simulated hours"
         + (f", {crashes} crashes injected" if crash_rate else "") + f" in {elapsed:.1f} s"
         f" ({elapsed / max(1, len(results)):.2f} s per seed); "
         + (f"{len(failed)} FAILED: {', '.join(map(str, failed))}" if failed else "all passed"))
    return results
