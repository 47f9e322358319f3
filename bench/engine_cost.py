"""The daemon's own cost per run, without a server: bytes per pending run and CPU seconds by phase.

Run: ``.venv/bin/python bench/scale.py 10000 --engine`` (this tree, beside the tree at
``BENCH_BASELINE`` when set: a checkout's ``daemon`` directory), or
``bench/engine_cost.py N [--json]`` for the flowsubmit on ``PYTHONPATH``. Prints a
table; asserts nothing.

One matrix job of N runs goes through the daemon's real path in this process:
``parse_job`` and its plan, the ``Executor`` (pre-submit checks, one ``RunSet``),
the journal (a real file, fsynced as in the daemon), the ``Tracker`` and the
structlog JSON lines (written to ``/dev/null``), with a gateway that answers at
once (creates return a new id; the event stream is a queue this script fills
with one final event per run). So the figures are flowsubmit's work alone, the
part that grows with the run count; the HTTP calls and the server are measured by
``bench/scale.py`` against a real server.

Phases, each timed with ``time.process_time`` (CPU of this process):

- plan: ``parse_job`` of the job file and its plan of N runs;
- prepare: the executor's pre-submit checks and run records;
- create: every run created (request, journal ``created``, ``run.submitted`` line) and watched;
- start: a Running event per run read off the stream (every real run has one before its
  final) and the job's count of runs by state (its ``states`` journal record) taken once,
  as the executor takes it every ``STATES_EVERY_S`` while runs change state; that one
  count is also printed alone (*states count*: its CPU with every run pending, which a
  long job pays every 2 s);
- final: every final event read off the stream, recorded (tracker, journal ``final``,
  ``run.finished`` line) and every run's task ended;
- result: the job's ``JobResult`` and its result file's bytes (``json_chunks``, as the
  daemon writes them; not the write itself).

Memory: the same job again under ``tracemalloc``; *bytes per pending run* =
(memory traced with every run created and none final - memory traced before the
job file was read) / N, and the part of it held by tracking alone (after the
creates - after prepare). The claim (a rename in the queue directory) is one
per job, not per run, and not measured here.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from flowsubmit import logs
from flowsubmit._types import Deployment, RunRequest, RunSnapshot
from flowsubmit.engine.tracker import Tracker
from flowsubmit.jobs.model import parse_job
from flowsubmit.queue.journal import Journal
from flowsubmit.queue.json_stream import json_chunks
from flowsubmit.service.executor import Executor

DEPLOYMENT = Deployment(
    id=str(uuid.uuid4()),
    name="bench-scale/d",
    parameter_schema={"type": "object", "properties": {"i": {"type": "integer"}}},
)


class InstantGateway:
    """A gateway that answers at once: creates return new ids, the stream is a queue."""

    def __init__(self) -> None:
        self.events: asyncio.Queue[RunSnapshot | None] = asyncio.Queue()
        self.created: list[str] = []

    async def resolve_deployment(self, name: str) -> Deployment:
        return DEPLOYMENT

    async def check_work_queue(self, deployment: Deployment, work_queue_name: str) -> None:
        return None

    async def create_run(self, deployment: Deployment, request: RunRequest) -> str:
        run_id = str(uuid.uuid4())
        self.created.append(run_id)
        return run_id

    async def read_runs(
        self, flow_run_ids: list[str], *, final_only: bool = False
    ) -> list[RunSnapshot]:
        return []

    async def cancel_run(self, flow_run_id: str) -> RunSnapshot | None:
        return None

    async def count_finished(self, tag: str, since: Any, until: Any) -> int | None:
        return 0

    async def read_finished(self, tag: str, since: Any, until: Any) -> list[RunSnapshot]:
        return []

    @contextlib.asynccontextmanager
    async def run_events(self, tag: str) -> AsyncIterator[AsyncIterator[RunSnapshot]]:
        yield self._stream()

    async def _stream(self) -> AsyncIterator[RunSnapshot]:
        while (snap := await self.events.get()) is not None:
            yield snap


def _running(run_id: str) -> RunSnapshot:
    now = datetime.now(UTC)
    return RunSnapshot(
        flow_run_id=run_id,
        state_type="RUNNING",
        state_name="Running",
        state_id=str(uuid.uuid4()),
        start_time=now,
        source="event",
        occurred=now,
    )


def _final(run_id: str, i: int) -> RunSnapshot:
    now = datetime.now(UTC)
    failed = i % 10 == 9
    return RunSnapshot(
        flow_run_id=run_id,
        state_type="FAILED" if failed else "COMPLETED",
        state_name="Failed" if failed else "Completed",
        flow_run_name=f"run-{i}",
        state_id=str(uuid.uuid4()),
        start_time=now,
        end_time=now,
        source="event",
        occurred=now,
        state_message="boom" if failed else None,
    )


async def _until(predicate: Any) -> None:
    while not predicate():  # noqa: ASYNC110 - the tracker's count has no event to wait on
        await asyncio.sleep(0.01)


async def one_job(runs: int, work: Path, memory: bool) -> dict[str, float]:
    """Run one job of ``runs`` runs; CPU seconds by phase (and memory when ``memory``)."""
    out: dict[str, float] = {}
    gateway = InstantGateway()
    async with Tracker(gateway, new_run_grace_s=3600) as tracker:  # type: ignore[arg-type]
        await tracker.wait_connected(5)
        await asyncio.sleep(0.3)  # past the live margin: every event is live
        gc.collect()
        base = tracemalloc.get_traced_memory()[0] if memory else 0
        cpu = time.process_time()
        data = json.dumps({"deployment": DEPLOYMENT.name, "matrix": {"i": list(range(runs))}})
        job = parse_job(data.encode(), max_runs=max(runs, 10_000))
        job.plan  # noqa: B018 - built once, here
        out["plan"], cpu = time.process_time() - cpu, time.process_time()
        journal, state = Journal.open(work / f"{uuid.uuid4().hex}.journal")
        executor = Executor(
            job, "bench", gateway=gateway, tracker=tracker, journal=journal, state=state
        )
        prepared = await executor.prepare()
        out["prepare"], cpu = time.process_time() - cpu, time.process_time()
        gc.collect()
        prepared_bytes = tracemalloc.get_traced_memory()[0] if memory else 0
        task = asyncio.create_task(executor.run(prepared))
        await _until(lambda: tracker.pending == runs)
        out["create"], cpu = time.process_time() - cpu, time.process_time()
        if memory:
            gc.collect()
            pending = tracemalloc.get_traced_memory()[0]
            out["bytes_per_pending"] = (pending - base) / runs
            out["tracking_bytes_per_pending"] = (pending - prepared_bytes) / runs
        for run_id in gateway.created:
            gateway.events.put_nowait(_running(run_id))
        await _until(gateway.events.empty)
        await asyncio.sleep(0)  # the tracker's listener calls, made soon after each event
        count = time.process_time()
        executor._write_states()
        out["states_count"] = time.process_time() - count
        out["start"], cpu = time.process_time() - cpu, time.process_time()
        for i, run_id in enumerate(gateway.created):
            gateway.events.put_nowait(_final(run_id, i))
        await _until(lambda: tracker.pending == 0)
        outcome = await task
        out["final"], cpu = time.process_time() - cpu, time.process_time()
        for _chunk in json_chunks(outcome.result.document()):  # as the result file is written
            pass
        out["result"] = time.process_time() - cpu
        journal.close()
        gateway.events.put_nowait(None)
    return out


def measure(runs: int) -> tuple[dict[str, float], dict[str, float]]:
    """(CPU seconds by phase, memory figures) of one job of ``runs`` runs each."""
    with open(os.devnull, "w") as devnull, tempfile.TemporaryDirectory() as tmp:
        stdout, sys.stdout = sys.stdout, devnull
        try:
            logs.configure("json", "info")  # the daemon's lines, written to /dev/null
            cpu = asyncio.run(one_job(runs, Path(tmp), memory=False))
            tracemalloc.start()
            mem = asyncio.run(one_job(runs, Path(tmp), memory=True))
            tracemalloc.stop()
        finally:
            sys.stdout = stdout
    return cpu, mem


PHASES = ("plan", "prepare", "create", "start", "final", "result")


def report(
    runs: int,
    cpu: dict[str, float],
    mem: dict[str, float],
    baseline: tuple[dict[str, float], dict[str, float]] | None = None,
) -> None:
    """The table: this tree's figures, beside the baseline's of the same run when given."""
    trees = [("this tree", cpu, mem)] + ([("baseline", *baseline)] if baseline else [])
    print(f"engine cost, one job of {runs} runs, instant gateway (machine shared):")
    print("| figure | " + " | ".join(name for name, _, _ in trees) + " |")
    print("|---|" + "---|" * len(trees))
    for phase in (*PHASES, "total"):
        cells = []
        for _, c, _ in trees:
            seconds = sum(c[p] for p in PHASES) if phase == "total" else c[phase]
            cells.append(f"{1000 * seconds / runs:.3f} ms ({seconds:.2f} s)")
        print(f"| CPU per run: {phase} | " + " | ".join(cells) + " |")
    cells = [f"{1000 * c['states_count']:.2f} ms" for _, c, _ in trees]
    print(f"| states count, {runs} runs pending (once) | " + " | ".join(cells) + " |")
    for key, label in (
        ("bytes_per_pending", "bytes per pending run (tracemalloc)"),
        ("tracking_bytes_per_pending", "of which held after the records were made"),
    ):
        print(f"| {label} | " + " | ".join(f"{m[key]:.0f}" for _, _, m in trees) + " |")


if __name__ == "__main__":
    n = int(next((a for a in sys.argv[1:] if not a.startswith("--")), 10_000))
    figures = measure(n)
    if "--json" in sys.argv:
        print(json.dumps(figures))
    else:
        report(n, *figures)
