"""Jobs that ended, as ``flowsubmit status`` shows them: the last few, and any one job by its id.

Read from the result and error files of ``done/``, ``failed/`` and ``rejected/`` alone
(the daemon writes each before it moves the job file), through ``fsutil.read_regular``:
a hostile entry named like a result costs its line, never the view.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flowsubmit.queue.folders import Queue, is_job_name
from flowsubmit.queue.fsutil import read_regular

__all__ = ["FINISHED_SHOWN", "finished", "one_job"]

#: Ended jobs shown, newest first.
FINISHED_SHOWN = 10
#: Failing runs ``status JOB_ID`` lists (the count is always complete).
FAILING_SHOWN = 20
_RESULT = ".result.json"
#: Result files are the daemon's own (producers cannot write done/ or failed/): read
#: whole, up to the bound the queue reads them with.
_RESULT_MAX_BYTES = 1 << 30


def finished(queue: Queue, now: float | None = None) -> list[dict[str, Any]]:
    """The last ``FINISHED_SHOWN`` jobs of ``done/`` and ``failed/``, newest first."""
    now = time.time() if now is None else now
    results = [
        path
        for folder in (queue.done, queue.failed)
        for path in folder.glob(f"*{_RESULT}")
        if is_job_name(path.name.removesuffix(_RESULT) + ".json")
    ]
    shown: list[dict[str, Any]] = []
    for path, ended in sorted(((p, _mtime(p)) for p in results), key=lambda x: -x[1]):
        result = _read(path)
        if result is not None:
            shown.append(_line(path, result, ended, now))
        if len(shown) == FINISHED_SHOWN:
            break
    return shown


def _line(path: Path, result: dict[str, Any], ended: float, now: float) -> dict[str, Any]:
    summary = result.get("summary")
    return {
        "job_id": path.name.removesuffix(_RESULT),
        "status": result.get("status"),
        "summary": summary.get("line") if isinstance(summary, dict) else None,
        "error": result.get("error"),
        "age_s": round(now - ended, 1),
        "result": str(path),
    }


def one_job(queue: Queue, job_id: str) -> dict[str, Any] | None:
    """Where job ``job_id`` is and, once it ended, how: ``None`` when no folder has it."""
    for folder in (queue.done, queue.failed):
        if (folder / f"{job_id}.json").exists():
            path = folder / f"{job_id}{_RESULT}"
            result = _read(path) or {}
            return {
                **_line(path, result, _mtime(path), time.time()),
                "where": f"{folder.name}/",
                "failing_runs": _failing(result),
            }
    error_path = queue.rejected / f"{job_id}.json.error.json"
    if (queue.rejected / f"{job_id}.json").exists():
        error = _read(error_path) or {}
        return {
            "job_id": job_id,
            "where": "rejected/",
            "status": "rejected",
            "summary": None,
            "error": error.get("message") or error.get("reason"),
            "result": str(error_path),
            "failing_runs": [],
        }
    for folder in (queue.processing, queue.incoming):
        if (folder / f"{job_id}.json").exists():
            status = "running" if folder == queue.processing else "queued"
            return {"job_id": job_id, "where": f"{folder.name}/", "status": status}
    return None


def _failing(result: dict[str, Any]) -> list[dict[str, Any]]:
    runs = result.get("runs")
    if not isinstance(runs, list):
        return []
    failing = [
        {
            "stage": run.get("stage"),
            "index": run.get("index"),
            "flow_run_id": run.get("flow_run_id"),
            "state_name": run.get("state_name"),
            "state_message": run.get("state_message") or run.get("error"),
        }
        for run in runs
        if isinstance(run, dict) and run.get("state_type") != "COMPLETED"
    ]
    return failing[:FAILING_SHOWN]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        document = json.loads(read_regular(path, _RESULT_MAX_BYTES, single_link=False)[0])
    except (OSError, ValueError):
        return None  # pruned meanwhile, unreadable, or not a result under its name
    return document if isinstance(document, dict) else None


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0
