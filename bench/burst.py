"""Event loss at scale: thousands of runs driven to their final states at once, every one recorded, none twice.

Run: ``.venv/bin/python bench/burst.py [runs] [--topology]`` (2,000 runs by default).
Prints a table; asserts nothing.

Prefect's server drops the events of a subscriber that has 256 waiting
(``SUBSCRIPTION_BACKLOG``, ``prefect/server/events/stream.py``). One ``flowsubmit run``
daemon, behind the counting loopback proxy of the tests (``tests/support/proxy.py``), gets one
matrix job of ``runs`` runs of a never-served deployment; once all are created a
driver process moves every run straight to its final state (every 10th Failed),
``DRIVER_CONCURRENCY`` calls in flight, as fast as the server takes them. Two rows:

- *stream keeps up*: the daemon reads its websocket as the events come;
- *consumer stalled*: while the driver runs, the proxy stops reading what the server
  sends on the websocket (a daemon that cannot keep up, a congested network): the
  server's sends block and its backlog for the daemon overflows, so most final events
  are dropped; the proxy resumes when the driver is done.

Per row: how long the driver took, how each final state was recorded (``event`` or
``poll``, from the ``run.finished`` lines), runs recorded twice, the runs on the server
by the job's tag (lost, duplicated), and how long after its ``end_time`` on the
server the slowest run was recorded.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the daemon harness of scale.py

import scale

DRIVER_CONCURRENCY = 16


async def _row(label: str, runs: int, stall: bool, driver_env: dict[str, str]) -> dict[str, Any]:
    from tests.support.proxy import Proxy

    from flowsubmit.engine.runset import job_tag

    name = await scale._deployment()
    work = Path(tempfile.mkdtemp(prefix="flowsubmit-burst-"))
    row: dict[str, Any] = {"server": label, "runs": runs, "stalled": stall}
    async with Proxy(scale._upstream_port()) as proxy:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSUBMIT_")}
        env = {**env, "PREFECT_API_URL": proxy.api_url}
        daemon = scale.DaemonProcess(work / "queue", env)
        try:
            await daemon.wait_for("service.ready", 1, 120)
            job = json.dumps({"deployment": name, "matrix": {"i": list(range(runs))}})
            job_id = await asyncio.to_thread(scale._enqueue, daemon.queue, job, env)
            await daemon.wait_for("run.submitted", runs, 3600)
            await asyncio.sleep(2)  # the creation events have reached the daemon
            if stall:
                proxy.stall_websockets()
            started = time.monotonic()
            driver = await asyncio.to_thread(
                subprocess.Popen,
                [sys.executable, __file__, "--drive", job_tag(job_id), str(runs)],
                env=driver_env,
            )
            await asyncio.to_thread(driver.wait)
            row["drive_s"] = time.monotonic() - started
            proxy.resume_websockets()
            await daemon.wait_for("job.finished", 1, 900)
        finally:
            daemon.stop()
    server_runs = await scale._runs_of(job_tag(job_id))
    ends = {str(r.id): r.end_time.timestamp() for r in server_runs if r.end_time}
    finished = daemon.events("run.finished")
    latencies = [scale._ts(f) - ends[f["flow_run_id"]] for f in finished]
    keys = Counter(r.idempotency_key for r in server_runs)
    row["lost"] = runs - len(keys)
    row["duplicated"] = len(server_runs) - len(keys)
    row["sources"] = dict(Counter(f["source"] for f in finished))
    row["twice"] = len(finished) - len({f["flow_run_id"] for f in finished})
    row["p50"], row["p95"] = statistics.median(latencies), scale._pct(latencies, 0.95)
    row["max"] = max(latencies)
    row["reads"] = sum(1 for s in proxy.seen if s.path.endswith("/flow_runs/filter"))
    row["counts"] = sum(1 for s in proxy.seen if s.path.endswith("/flow_runs/count"))
    result = json.loads(next(daemon.queue.glob("*/*.result.json")).read_text())
    row["result"] = (result["summary"]["total"], result["summary"]["succeeded"])
    shutil.rmtree(work, ignore_errors=True)
    return row


def _print(rows: list[dict[str, Any]]) -> None:
    print(
        "| server | runs | websocket | driven in s | by event | by reconciliation "
        "| recorded twice | lost | duplicated | recorded after end p50 / p95 / max s | reads | counts "
        "| (reads + counts) per run |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['server']} | {r['runs']} | {'stalled' if r['stalled'] else 'read'} "
            f"| {r['drive_s']:.1f} | {r['sources'].get('event', 0)} | {r['sources'].get('poll', 0)} "
            f"| {r['twice']} | {r['lost']} | {r['duplicated']} "
            f"| {r['p50']:.2f} / {r['p95']:.2f} / {r['max']:.2f} | {r['reads']} | {r['counts']} "
            f"| {(r['reads'] + r['counts']) / r['runs']:.3f} |"
        )
    for r in rows:
        print(
            f"- {'stalled' if r['stalled'] else 'read'}: job result {r['result'][0]} runs, {r['result'][1]} succeeded"
        )


async def _drive(tag: str, runs: int) -> None:
    from tests.support.driver import drive

    ids = sorted(str(r.id) for r in await scale._runs_of(tag))
    failed = set(ids[9::10])
    half = DRIVER_CONCURRENCY // 2
    await asyncio.gather(
        drive([i for i in ids if i not in failed], "Completed", half, direct=True),
        drive(sorted(failed), "Failed", half, direct=True),
    )


def main(runs: int, topology: bool) -> None:
    label = "production topology" if topology else "embedded SQLite"
    # One server for both rows (Prefect reads its API URL once per process); the first
    # row's runs are all final before the second starts.
    with scale._server(topology) as driver_env:
        rows = [asyncio.run(_row(label, runs, stall, driver_env)) for stall in (False, True)]
    _print(rows)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--drive" in sys.argv:
        asyncio.run(_drive(args[0], int(args[1])))
    else:
        main(int(args[0]) if args else 2000, "--topology" in sys.argv)
