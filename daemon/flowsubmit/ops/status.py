"""The live view of a queue (``flowsubmit status``): one JSON document read from the folders, journals, locks and heartbeats, and its screen.

Everything comes from the queue directory, never from a daemon's memory, so the view
is right after a restart and while no daemon runs: progress from each job's journal,
ownership from its lock (held by a live daemon, or free: the job waits for
recovery), daemons from their heartbeat files. The document's shape is documented in
docs/operations.md ("Live status") and is contract.

Every file a producer could have written, grown or replaced (a job file, a file in
``rejected/``) is read through ``fsutil.read_regular``: at most ``max_job_bytes``, never
a FIFO or a link, so one hostile entry costs a line of the view, not the view.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from flowsubmit.errors import JobRejected
from flowsubmit.ops.finished import finished
from flowsubmit.ops.heartbeat import read as read_heartbeats
from flowsubmit.queue.folders import FOLDERS, Queue, is_job_name, job_files
from flowsubmit.queue.fsutil import read_regular
from flowsubmit.queue.journal import JournalState, replay
from flowsubmit.queue.locking import JobLock
from flowsubmit.settings import Settings

__all__ = ["document", "progress_bar", "render"]

#: Rejections shown, newest first.
LAST_REJECTIONS = 5
#: Queued job ids listed (the count is always complete).
QUEUED_SHOWN = 20
#: The settings' default ``max_job_bytes``, for a caller that passes none.
DEFAULT_MAX_JOB_BYTES: int = Settings.model_fields["max_job_bytes"].default


def document(
    queue: Queue, *, now: float | None = None, max_job_bytes: int = DEFAULT_MAX_JOB_BYTES
) -> dict[str, Any]:
    """The status of ``queue`` as one JSON-ready document (docs/operations.md, "Live status").

    A job file larger than ``max_job_bytes`` is not read: its total of runs shows as unknown.
    """
    now = time.time() if now is None else now
    return {
        "queue": str(queue.root),
        "time": _iso(now),
        "counts": {f: len(job_files(queue.root / f)) for f in FOLDERS if f != "tmp"},
        "daemons": [_daemon(beat, now) for beat in read_heartbeats(queue.root)],
        "jobs": [_job(queue, path.stem, now, max_job_bytes) for path in queue.running()],
        "queued": _queued(queue),
        "rejections": _rejections(queue, max_job_bytes),
        "finished": finished(queue, now),
    }


def _daemon(beat: Any, now: float) -> dict[str, Any]:
    problem = beat.problem(now)
    return {
        "pid": beat.pid,
        "host": beat.host,
        "version": beat.version,
        "last_loop_s": round(now - beat.time, 1),
        "tracker": beat.tracker,
        "prefect_reachable": beat.prefect_reachable,
        "healthy": problem is None,
        "problem": problem,
    }


def _job(queue: Queue, job_id: str, now: float, max_job_bytes: int) -> dict[str, Any]:
    try:
        state = replay(queue.processing / f"{job_id}.journal")
        counts: dict[str, int | None] = {**state.run_counts()}
    except PermissionError:  # another producer's job: its name is all this user may see
        state = JournalState()
        counts = dict.fromkeys(JournalState().run_counts())
    claimed = _unix(state.claimed_at)
    owned = JobLock.held(queue.processing / f"{job_id}.lock")
    total = state.total_runs
    if total is None:  # claimed by a version that did not record it
        total = _total_runs(queue.processing / f"{job_id}.json", max_job_bytes)
    return {
        "job_id": job_id,
        "owner": {True: "alive", False: "waiting_for_recovery", None: "unknown"}[owned],
        "claimed_at": state.claimed_at,
        "age_s": None if claimed is None else round(now - claimed, 1),
        "cancel_requested": queue.cancel_requested(job_id),
        "runs": {"total": total, **counts},
    }


def _total_runs(path: Path, max_job_bytes: int) -> int | None:
    """Runs the job file asks for; None when it is not a regular file, larger than ``max_job_bytes``, or bad."""
    from flowsubmit.jobs.model import parse_job  # pydantic models: only the job view needs them

    try:
        data, _ = read_regular(path, max_job_bytes, single_link=False)
        return parse_job(data, max_runs=10**9).total_runs
    except (OSError, JobRejected):  # fsutil.UnsafeFile is an OSError
        return None


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def _queued(queue: Queue) -> dict[str, Any]:
    names = [c.name for c in queue.scan()]  # oldest first, as the daemon judges them
    return {"count": len(names), "job_ids": [n.removesuffix(".json") for n in names][:QUEUED_SHOWN]}


def _rejections(queue: Queue, max_bytes: int) -> list[dict[str, Any]]:
    errors = [p for p in queue.rejected.glob("*.error.json") if is_job_name(p.name)]
    newest = sorted(errors, key=_mtime, reverse=True)[:LAST_REJECTIONS]
    found: list[dict[str, Any]] = []
    for path in newest:
        try:
            error = json.loads(read_regular(path, max_bytes, single_link=False)[0])
        except (OSError, ValueError):
            continue  # pruned meanwhile, or not an error file (a FIFO, a directory) under its name
        if not isinstance(error, dict):
            continue
        found.append(
            {
                "file": path.name.removesuffix(".error.json"),
                "at": _iso(_mtime(path)),
                "reason": error.get("reason"),
                "field": error.get("field"),
            }
        )
    return found


# -- the screen -------------------------------------------------------------------------------


def render(doc: dict[str, Any], *, bars: bool) -> RenderableType:
    """The status screen; ``bars`` adds a progress bar per job (on a terminal)."""
    counts = "  ".join(f"{folder}: {n}" for folder, n in doc["counts"].items())
    parts: list[RenderableType] = [Text(f"{doc['queue']}  {counts}", style="bold")]
    parts += [Text(_daemon_line(d)) for d in doc["daemons"]] or [
        Text("no daemon on this host (no heartbeat file)", style="yellow")
    ]
    if doc["jobs"]:
        parts.append(_jobs_table(doc["jobs"], bars=bars))
    queued = doc["queued"]
    if queued["count"]:
        more = queued["count"] - len(queued["job_ids"])
        tail = f" (+{more} more)" if more > 0 else ""
        parts.append(Text(f"queued ({queued['count']}): {', '.join(queued['job_ids'])}{tail}"))
    if doc["finished"]:
        parts.append(_finished_table(doc["finished"]))
    if doc["rejections"]:
        parts.append(Text("last rejections:"))
        for r in doc["rejections"]:
            field = f"field {r['field']!r}: " if r["field"] else ""
            parts.append(Text(f"  {r['at'][:19]}Z {r['file']}: {field}{r['reason']}"))
    return Group(*parts)


def _daemon_line(d: dict[str, Any]) -> str:
    state = "ok" if d["healthy"] else f"UNHEALTHY: {d['problem']}"
    return (
        f"daemon pid {d['pid']} on {d['host']}: {state} "
        f"(loop {d['last_loop_s']} s ago, tracker {d['tracker'] or 'starting'})"
    )


#: A running job's run counts, as columns (``created`` is the sum of them all).
_RUN_COUNTS = ("scheduled", "late", "running", "succeeded", "failed", "cancelled")


def _jobs_table(jobs: list[dict[str, Any]], *, bars: bool) -> Table:
    table = Table(box=None, pad_edge=False)
    columns = ["job", "runs", "created", *_RUN_COUNTS, "age"]
    for name in columns:
        table.add_column(name, justify="left" if name == "job" else "right")
    if bars:
        table.add_column("progress", width=BAR_WIDTH)
    table.add_column("owner")
    for job in jobs:
        runs = job["runs"]
        total = runs["total"]
        cells: list[RenderableType] = [
            job["job_id"],
            "?" if total is None else str(total),
            *(_count(runs[k]) for k in ("created", *_RUN_COUNTS)),
            _duration(job["age_s"]),
        ]
        if bars:
            cells.append(progress_bar(runs, total))
        owner = str(job["owner"]).replace("_", " ")
        if job["cancel_requested"]:
            owner += ", cancel requested"
        cells.append(owner)
        table.add_row(*cells)
    return table


def _finished_table(jobs: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, title="recently finished", title_justify="left")
    for name in ("job", "status", "summary", "ended", "result"):
        table.add_column(name, justify="right" if name == "ended" else "left")
    for job in jobs:
        style = "green" if job["status"] == "succeeded" else "red"
        summary = str(job["summary"] or "").removeprefix("Summary → ")
        if job["error"]:
            summary = f"{summary}; {job['error']}" if summary else str(job["error"])
        table.add_row(
            job["job_id"],
            Text(str(job["status"] or "?"), style=style),
            summary,
            f"{_duration(job['age_s'])} ago",
            job["result"],
        )
    return table


#: The progress bar's width, and each part's colour: succeeded green, failed red, cancelled
#: yellow, the runs not final yet grey.
BAR_WIDTH = 24
_BAR_PARTS = (("succeeded", "green"), ("failed", "red"), ("cancelled", "yellow"))


def progress_bar(runs: dict[str, int | None], total: int | None) -> Text:
    """One job's bar: a part per outcome in its colour, the rest grey (``?`` counts as 0)."""
    scale = BAR_WIDTH / max(total or 0, sum(runs[k] or 0 for k, _ in _BAR_PARTS), 1)
    bar, used = Text(), 0
    for key, colour in _BAR_PARTS:
        cells = min(round((runs[key] or 0) * scale), BAR_WIDTH - used)
        bar.append("━" * cells, style=colour)
        used += cells
    bar.append("━" * (BAR_WIDTH - used), style="grey37")
    return bar


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat()


def _unix(iso: str | None) -> float | None:
    if iso is None:
        return None
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return None
