"""What a job produced: per-run records, the summary counts and sentence, the result document."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from flowsubmit._types import JobStatus, RunSnapshot
from flowsubmit.redaction import redact

__all__ = ["RunRecord", "finished_message", "result_document", "summary_counts", "summary_line"]


@dataclass
class RunRecord:
    """One run of a job as it stands: filled in as it is created, retried and finished."""

    stage: int
    index: int
    deployment: str
    parameters: dict[str, Any]
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    state_name: str | None = None
    state_type: str | None = None
    attempts: int = 0
    start_time: datetime | None = None
    end_time: datetime | None = None
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        """Success is the state type COMPLETED."""
        return self.state_type == "COMPLETED"

    def record(self, snap: RunSnapshot) -> None:
        """Take the final snapshot of the current attempt."""
        self.flow_run_id = snap.flow_run_id
        self.flow_run_name = snap.flow_run_name or self.flow_run_name
        self.state_name = snap.state_name
        self.state_type = snap.state_type
        self.start_time = snap.start_time
        self.end_time = snap.end_time

    def as_dict(self) -> dict[str, Any]:
        """The run's entry in the result file (secret-like parameters masked)."""
        return {
            "stage": self.stage,
            "index": self.index,
            "deployment": self.deployment,
            "parameters": redact(self.parameters),
            "flow_run_id": self.flow_run_id,
            "flow_run_name": self.flow_run_name,
            "state_name": self.state_name,
            "state_type": self.state_type,
            "attempts": self.attempts,
            "start_time": _iso(self.start_time),
            "end_time": _iso(self.end_time),
            "error": self.error,
        }


def summary_counts(
    state_types_and_names: Iterable[tuple[str | None, str | None]],
) -> dict[str, Any]:
    """Counts of a set of runs: total, succeeded, failed and by state name."""
    pairs = list(state_types_and_names)
    succeeded = sum(1 for state_type, _ in pairs if state_type == "COMPLETED")
    by_state = Counter(name or "NotFinished" for _, name in pairs)
    return {
        "total": len(pairs),
        "succeeded": succeeded,
        "failed": len(pairs) - succeeded,
        "by_state": dict(sorted(by_state.items())),
    }


def summary_line(succeeded: int, total: int) -> str:
    """``Summary → 18/20 succeeded, 2 failed``."""
    return f"Summary → {succeeded}/{total} succeeded, {total - succeeded} failed"


def finished_message(deployment: str, snap: RunSnapshot) -> str:
    """``✅ [deployment] Run abc12345 finished with state: Completed`` (❌ unless COMPLETED)."""
    mark = "✅" if snap.succeeded else "❌"
    return (
        f"{mark} [{deployment}] Run {snap.flow_run_id[:8]} finished with state: {snap.state_name}"
    )


def result_document(
    *,
    job_id: str,
    status: JobStatus,
    started_at: datetime,
    ended_at: datetime,
    records: list[RunRecord],
    error: str | None = None,
    producer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The content of ``JOB.result.json``; ``producer`` is who dropped the job (#14)."""
    counts = summary_counts((r.state_type, r.state_name) for r in records)
    return {
        "job_id": job_id,
        "status": status.value,
        "producer": producer,
        "started_at": _iso(started_at),
        "ended_at": _iso(ended_at),
        "duration_s": round((ended_at - started_at).total_seconds(), 3),
        "summary": {**counts, "line": summary_line(counts["succeeded"], counts["total"])},
        "error": error,
        "runs": [r.as_dict() for r in sorted(records, key=lambda r: (r.stage, r.index))],
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
