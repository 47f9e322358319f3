"""What runs produced: per-run records, the summary counts and sentence, the typed result document."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from flowsubmit._types import JobStatus, RunSnapshot
from flowsubmit.redaction import redact, redact_text

__all__ = ["AttemptResult", "JobResult", "RunRecord", "RunResult", "Summary", "finished_message"]


@dataclass
class RunRecord:
    """One run of a set as it stands: what to create, and what became of every attempt."""

    stage: int
    index: int
    deployment: str
    parameters: dict[str, Any]
    tags: tuple[str, ...] = ()
    job_variables: dict[str, Any] = field(default_factory=dict)
    #: The flow run name asked for (Prefect makes one up when None).
    name: str | None = None
    flow_run_id: str | None = None
    flow_run_name: str | None = None
    state_name: str | None = None
    state_type: str | None = None
    state_message: str | None = None
    attempts: int = 0
    start_time: datetime | None = None
    end_time: datetime | None = None
    error: str | None = None
    #: The run of every attempt, oldest first (the last one is ``flow_run_id``).
    run_ids: list[str] = field(default_factory=list)
    #: The final state of every attempt that has one.
    snapshots: dict[str, RunSnapshot] = field(default_factory=dict)

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
        self.state_message = snap.state_message
        self.start_time = snap.start_time
        self.end_time = snap.end_time

    def message_of(self, snap: RunSnapshot) -> str | None:
        """The state message of one of this run's attempts, secrets masked."""
        return redact_text(snap.state_message, self.parameters) if snap.state_message else None

    def result(self) -> RunResult:
        """The run's entry in the result document, as it stands now."""
        return RunResult(
            stage=self.stage,
            index=self.index,
            deployment=self.deployment,
            parameters=self.parameters,
            flow_run_id=self.flow_run_id,
            flow_run_name=self.flow_run_name,
            state_name=self.state_name,
            state_type=self.state_type,
            state_message=(
                redact_text(self.state_message, self.parameters) if self.state_message else None
            ),
            attempts=tuple(self._attempt(run_id) for run_id in self.run_ids),
            start_time=self.start_time,
            end_time=self.end_time,
            error=redact_text(self.error, self.parameters) if self.error else None,
        )

    def _attempt(self, run_id: str) -> AttemptResult:
        snap = self.snapshots.get(run_id)
        if snap is None:
            return AttemptResult(run_id, None, None, None, None, None)
        return AttemptResult(
            run_id,
            snap.state_name,
            snap.state_type,
            self.message_of(snap),
            snap.start_time,
            snap.end_time,
        )


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """One creation of a run (``retries`` make more): its flow run and how it ended."""

    flow_run_id: str
    state_name: str | None
    state_type: str | None
    #: Prefect's state message, secrets masked.
    state_message: str | None
    start_time: datetime | None
    end_time: datetime | None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form."""
        return {
            "flow_run_id": self.flow_run_id,
            "state_name": self.state_name,
            "state_type": self.state_type,
            "state_message": self.state_message,
            "start_time": _iso(self.start_time),
            "end_time": _iso(self.end_time),
        }


@dataclass(frozen=True, slots=True)
class RunResult:
    """One run's entry in ``JOB.result.json``."""

    stage: int
    index: int
    deployment: str
    parameters: dict[str, Any]
    flow_run_id: str | None
    flow_run_name: str | None
    state_name: str | None
    state_type: str | None
    #: The latest attempt's state message, secrets masked.
    state_message: str | None
    attempts: tuple[AttemptResult, ...]
    start_time: datetime | None
    end_time: datetime | None
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (secret-like parameters masked)."""
        return {
            "stage": self.stage,
            "index": self.index,
            "deployment": self.deployment,
            "parameters": redact(self.parameters),
            "flow_run_id": self.flow_run_id,
            "flow_run_name": self.flow_run_name,
            "state_name": self.state_name,
            "state_type": self.state_type,
            "state_message": self.state_message,
            "attempts": [a.as_dict() for a in self.attempts],
            "start_time": _iso(self.start_time),
            "end_time": _iso(self.end_time),
            "error": self.error,
        }


@dataclass(frozen=True, slots=True)
class Summary:
    """The counts of a set of runs (their latest attempts) and the seed's sentence."""

    total: int
    succeeded: int
    #: Runs that did not complete and were not cancelled (Failed, Crashed, not finished...).
    failed: int
    by_state: dict[str, int]
    cancelled: int = 0

    @classmethod
    def of(cls, records: Iterable[RunRecord]) -> Summary:
        """Count ``records`` by their current state (``NotFinished`` when they have none)."""
        pairs = [(r.state_type, r.state_name) for r in records]
        succeeded = sum(1 for state_type, _ in pairs if state_type == "COMPLETED")
        cancelled = sum(1 for state_type, _ in pairs if state_type == "CANCELLED")
        by_state = Counter(name or "NotFinished" for _, name in pairs)
        failed = len(pairs) - succeeded - cancelled
        return cls(len(pairs), succeeded, failed, dict(sorted(by_state.items())), cancelled)

    @property
    def line(self) -> str:
        """``Summary → 18/20 succeeded, 2 failed``; ``…, 1 failed, 9 cancelled`` when runs were cancelled."""
        line = f"Summary → {self.succeeded}/{self.total} succeeded, {self.failed} failed"
        return f"{line}, {self.cancelled} cancelled" if self.cancelled else line

    def as_dict(self) -> dict[str, Any]:
        """The ``summary`` object of the result document."""
        return {
            "total": self.total,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "cancelled": self.cancelled,
            "by_state": dict(self.by_state),
            "line": self.line,
        }


def finished_message(deployment: str, snap: RunSnapshot) -> str:
    """``✅ [deployment] Run abc12345 finished with state: Completed`` (❌ unless COMPLETED)."""
    mark = "✅" if snap.succeeded else "❌"
    return (
        f"{mark} [{deployment}] Run {snap.flow_run_id[:8]} finished with state: {snap.state_name}"
    )


@dataclass(frozen=True, slots=True)
class JobResult:
    """What a job produced: the content of ``JOB.result.json``."""

    job_id: str
    status: JobStatus
    started_at: datetime
    ended_at: datetime
    summary: Summary
    runs: tuple[RunResult, ...]
    error: str | None = None
    #: Who dropped the job, as ``Producer.as_dict()``.
    producer: dict[str, Any] | None = None

    @classmethod
    def of(
        cls,
        *,
        job_id: str,
        status: JobStatus,
        started_at: datetime,
        ended_at: datetime,
        records: Iterable[RunRecord],
        error: str | None = None,
        producer: dict[str, Any] | None = None,
    ) -> JobResult:
        """The result of a job whose runs stand as ``records``."""
        ordered = sorted(records, key=lambda r: (r.stage, r.index))
        return cls(
            job_id=job_id,
            status=status,
            started_at=started_at,
            ended_at=ended_at,
            summary=Summary.of(ordered),
            runs=tuple(r.result() for r in ordered),
            error=error,
            producer=producer,
        )

    @property
    def duration_s(self) -> float:
        """Seconds from start to end, to the millisecond."""
        return round((self.ended_at - self.started_at).total_seconds(), 3)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form written to ``JOB.result.json``."""
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "producer": self.producer,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "duration_s": self.duration_s,
            "summary": self.summary.as_dict(),
            "error": self.error,
            "runs": [r.as_dict() for r in self.runs],
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None
