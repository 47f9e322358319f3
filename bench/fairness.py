"""Fair submission: how long small jobs wait while a big job submits, and what fairness costs the big job.

Run: ``.venv/bin/python bench/fairness.py [big_runs] [--only=equal,higher]``
(``make bench-fairness``; 3000 runs by default, every scenario; "alone" always runs).
Prints a table; asserts nothing.

A fresh local SQLite-backed server and one daemon per scenario (default settings, JSON
logs), on a deployment nobody serves: runs stay Scheduled. (On one server for all, a
later scenario would meet the earlier scenarios' runs turning Late: Prefect's late-runs
service rewrites every Scheduled run nobody picked up, and on SQLite those writes
contend with the creates.) A scenario drops the big job, waits until a tenth of its
runs are created, then drops a 1-run job and a 20-run job (at priority 0, or 10). Times
come from the daemon's own log lines: a job's wait is its ``job.claimed`` to its last
``run.submitted``; the big job's submission time is the same span for it. "alone" is
the big job with nothing else, measured in the same run as the baseline.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from flowsubmit.local.localserver import LocalServer

ROOT = Path(__file__).resolve().parent.parent
DEPLOYMENT = "bench-fair/d"
SMALL = (1, 20)


def _log(path: Path) -> list[dict[str, Any]]:
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue  # a line cut in the middle of its write
    return lines


def _at(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["timestamp"]).timestamp()


def _drop(queue: Path, job_id: str, runs: int, priority: int) -> None:
    job: dict[str, Any] = {
        "id": job_id,
        "deployment": DEPLOYMENT,
        "runs": [{"parameters": {"i": i}} for i in range(runs)],
    }
    if priority:
        job["priority"] = priority
    staged = queue / "tmp" / f"{job_id}.json"
    staged.write_text(json.dumps(job))
    os.rename(staged, queue / "incoming" / f"{job_id}.json")


def _spans(lines: list[dict[str, Any]]) -> dict[str, tuple[float, float, int]]:
    """By job: (claimed at, last run created at, runs created)."""
    claimed = {x["job_id"]: _at(x) for x in lines if x["event"] == "job.claimed"}
    spans: dict[str, tuple[float, float, int]] = {}
    for x in lines:
        if x["event"] == "run.submitted" and x["job_id"] in claimed:
            _, _, n = spans.get(x["job_id"], (0.0, 0.0, 0))
            spans[x["job_id"]] = (claimed[x["job_id"]], _at(x), n + 1)
    return spans


def scenario(
    server: LocalServer, work: Path, name: str, big: int, priority: int | None
) -> dict[str, tuple[float, float, int] | str]:
    """One daemon: the big job, and (unless ``priority`` is None) the small jobs dropped while it submits."""
    queue = work / name
    for folder in ("tmp", "incoming"):
        (queue / folder).mkdir(parents=True)
    log_path = work / f"{name}.log"
    env = server.env(FLOWSUBMIT_LOG_FORMAT="json", FLOWSUBMIT_RESCAN_INTERVAL_S="0.5")
    with open(log_path, "wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "flowsubmit.cli", "run", "--queue", str(queue)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    expected = {f"{name}-big": big}
    try:
        while b"service.ready" not in log_path.read_bytes():
            time.sleep(0.1)
        _drop(queue, f"{name}-big", big, 0)
        if priority is not None:
            while _spans(_log(log_path)).get(f"{name}-big", (0, 0, 0))[2] < big // 10:
                time.sleep(0.1)
            for runs in SMALL:
                _drop(queue, f"{name}-small{runs}", runs, priority)
                expected[f"{name}-small{runs}"] = runs
        while True:
            spans = _spans(_log(log_path))
            rejected = {x.get("file") for x in _log(log_path) if x["event"] == "job.rejected"}
            if all(
                spans.get(job, (0, 0, 0))[2] >= runs or f"{job}.json" in rejected
                for job, runs in expected.items()
            ):
                break
            time.sleep(0.5)
    finally:
        daemon.terminate()
        daemon.wait(60)
    return {job: spans.get(job) or "rejected" for job in expected}


async def _setup() -> None:
    from prefect import flow

    @flow(name="bench-fair")
    def bench_fair(i: int = 0) -> int:
        return i

    deployment = await bench_fair.to_deployment(name="d")  # type: ignore[misc]
    await deployment.apply()


def main(big: int, only: set[str] | None = None) -> None:
    rows = [("alone", None), ("equal", 0), ("higher", 10)]
    rows = [row for row in rows if only is None or row[0] in only or row[0] == "alone"]
    results = {}
    with tempfile.TemporaryDirectory(prefix="flowsubmit-fair-") as tmp:
        for name, priority in rows:
            with LocalServer() as server:
                # The deployment is made in a process of its own: Prefect reads its API URL
                # once per process, and each scenario has a server of its own.
                subprocess.run(
                    [sys.executable, __file__, "--setup"], env=server.env(), check=True, cwd=ROOT
                )
                results[name] = scenario(server, Path(tmp), name, big, priority)
    alone = results["alone"]["alone-big"]
    assert not isinstance(alone, str)
    alone_s = alone[1] - alone[0]
    print(
        "| scenario | small priority | job | runs | claim → last run created, s | big job runs/s | vs alone |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, priority in rows:
        for job, span in results[name].items():
            kind = job.removeprefix(f"{name}-")
            if isinstance(span, str):
                print(f"| {name} | {priority} | {kind} | | {span} | | |")
                continue
            seconds = span[1] - span[0]
            rate = f"{span[2] / seconds:.1f}" if kind == "big" else ""
            ratio = f"{seconds / alone_s:.2f}×" if kind == "big" else ""
            shown = "-" if priority is None else priority
            print(f"| {name} | {shown} | {kind} | {span[2]} | {seconds:.2f} | {rate} | {ratio} |")


if __name__ == "__main__":
    if "--setup" in sys.argv:
        asyncio.run(_setup())
    else:
        args = [a for a in sys.argv[1:] if not a.startswith("--")]
        only = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--only=")), None)
        main(int(args[0]) if args else 3000, set(only.split(",")) if only else None)
