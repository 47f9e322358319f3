"""What runs produced: each run's one record, the summary, and the result document as a view of the records."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from flowsubmit._types import JobStatus, RunSnapshot
from flowsubmit.redaction import redact, redact_text

__all__ = ["NOT_CREATED", "JobResult", "RunRecord", "Summary", "finished_message"]

#: The state name of a run whose latest attempt could not be created (the run has an ``error``).
NOT_CREATED = "NotCreated"


@dataclass(slots=True)
class RunRecord:
    """One run of a set: what to create, and the final state of every attempt; the run's only record.

    A final state is kept here once, as the attempt's snapshot with its state message
    masked when it is recorded (``record``); the ``run.finished`` line, the library's
    line and the result document (``as_dict``) all read that one message. The run's
    state is its latest final attempt's: a run is retried only once its attempt is
    final, so ``finals`` come in attempt order. ``run_ids`` and ``finals`` are tuples,
    replaced and never changed in place, so a copy of a record is a snapshot of it.
    """

    stage: int
    index: int
    deployment: str
    parameters: dict[str, Any]
    tags: tuple[str, ...] = ()
    job_variables: dict[str, Any] = field(default_factory=dict)
    #: The flow run name asked for (Prefect makes one up when None).
    name: str | None = None
    #: Creations asked for so far (the latest may have no run yet).
    attempts: int = 0
    #: The run of every attempt, oldest first.
    run_ids: tuple[str, ...] = ()
    #: The final snapshot of every attempt that has one, oldest first, state message masked.
    finals: tuple[RunSnapshot, ...] = ()
    #: Why the latest attempt could not be created, secrets masked.
    error: str | None = None
    #: The latest attempt could not be created: the run's state name is ``NotCreated``.
    not_created: bool = False

    # -- recording ---------------------------------------------------------------------------

    def add_run(self, run_id: str) -> None:
        """The current attempt's run was created (or found by its key)."""
        self.run_ids = (*self.run_ids, run_id)

    def record(self, snap: RunSnapshot) -> RunSnapshot:
        """Keep the final snapshot of one attempt, its state message masked; returns what was kept.

        The one place a run's state message is masked for its views: the log lines and
        the result read the kept one (the journal masks the line it writes itself).
        """
        masked = redact_text(snap.state_message, self.parameters) if snap.state_message else None
        # Unchanged, the snapshot itself is kept: the run-set holds it too (``RunSet.snapshot``),
        # and at 100,000 finals a copy each is 12 MB.
        kept = snap if masked == snap.state_message else replace(snap, state_message=masked)
        self.finals = (*self.finals, kept)
        return kept

    def creation_failed(self, error: str) -> None:
        """The current attempt could not be created: the run ends ``NotCreated`` with ``error``."""
        self.error = redact_text(error, self.parameters) if error else None
        self.not_created = True

    # -- the run's state: its latest final attempt's ------------------------------------------

    @property
    def final(self) -> RunSnapshot | None:
        """The final snapshot of the latest attempt that has one."""
        return self.finals[-1] if self.finals else None

    def final_of(self, run_id: str) -> RunSnapshot | None:
        """The final snapshot of one attempt's run, if it has one."""
        return next((snap for snap in self.finals if snap.flow_run_id == run_id), None)

    @property
    def flow_run_id(self) -> str | None:
        """The latest attempt's run, final or not."""
        return self.run_ids[-1] if self.run_ids else None

    @property
    def flow_run_name(self) -> str | None:
        """The latest name a final snapshot gave (an event may come without one)."""
        return next(
            (snap.flow_run_name for snap in reversed(self.finals) if snap.flow_run_name), None
        )

    @property
    def state_name(self) -> str | None:
        """``NotCreated``, the latest final state's name, or None."""
        if self.not_created:
            return NOT_CREATED
        return self.final.state_name if self.final else None

    @property
    def state_type(self) -> str | None:
        """The latest final state's type, or None."""
        return self.final.state_type if self.final else None

    @property
    def state_message(self) -> str | None:
        """The latest final state's message, secrets masked."""
        return self.final.state_message if self.final else None

    @property
    def start_time(self) -> datetime | None:
        """When the latest final attempt started, if known."""
        return self.final.start_time if self.final else None

    @property
    def end_time(self) -> datetime | None:
        """When the latest final attempt ended, if known."""
        return self.final.end_time if self.final else None

    @property
    def succeeded(self) -> bool:
        """Success is the state type COMPLETED."""
        return self.state_type == "COMPLETED"

    # -- the result document's entry -----------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """The run's entry in ``JOB.result.json`` (secret-like parameters masked)."""
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
            "attempts": [_attempt_dict(run_id, self.final_of(run_id)) for run_id in self.run_ids],
            "start_time": _iso(self.start_time),
            "end_time": _iso(self.end_time),
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunRecord:
        """The record a run's entry in ``JOB.result.json`` stands for: ``as_dict`` read back.

        The entry holds less than the record did: its parameters come back masked, the
        tags, job variables and name asked for are not in it, and each attempt's final
        comes back with the fields the entry shows (``source`` ``result``; the run's
        ``flow_run_name`` on the latest final). Such a record is for reading, not running.
        """
        attempts = data["attempts"]
        finals = [_final_from(attempt) for attempt in attempts if attempt["state_type"]]
        if finals:
            finals[-1] = replace(finals[-1], flow_run_name=data["flow_run_name"])
        return cls(
            data["stage"],
            data["index"],
            data["deployment"],
            data["parameters"],
            attempts=len(attempts),
            run_ids=tuple(attempt["flow_run_id"] for attempt in attempts),
            finals=tuple(finals),
            error=data["error"],
            not_created=data["state_name"] == NOT_CREATED,
        )


def _attempt_dict(run_id: str, final: RunSnapshot | None) -> dict[str, Any]:
    """One attempt in a run's ``attempts``: its run, and how it ended (all None while not final)."""
    return {
        "flow_run_id": run_id,
        "state_name": final.state_name if final else None,
        "state_type": final.state_type if final else None,
        "state_message": final.state_message if final else None,
        "start_time": _iso(final.start_time) if final else None,
        "end_time": _iso(final.end_time) if final else None,
    }


def _final_from(attempt: Mapping[str, Any]) -> RunSnapshot:
    return RunSnapshot(
        flow_run_id=attempt["flow_run_id"],
        state_type=attempt["state_type"],
        state_name=attempt["state_name"],
        start_time=_time(attempt["start_time"]),
        end_time=_time(attempt["end_time"]),
        source="result",
        state_message=attempt["state_message"],
    )


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
    """What a job produced: ``JOB.result.json`` as a view of its runs' records at one moment.

    ``runs`` are copies of the records taken when the result is made (``of``). A record's
    attempts and finals are tuples it replaces and never changes, so the copy keeps them
    as they stood: a final recorded afterwards changes the live record, not the result,
    and every ``as_dict`` of one result is the same document. The summary and the
    duration are views too, of the runs and the times.
    """

    job_id: str
    status: JobStatus
    started_at: datetime
    ended_at: datetime
    #: The runs in (stage, index) order, as they stood when the result was made.
    runs: tuple[RunRecord, ...]
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
        """The result of a job whose runs stand as ``records`` now."""
        ordered = sorted(records, key=lambda r: (r.stage, r.index))
        return cls(
            job_id=job_id,
            status=status,
            started_at=started_at,
            ended_at=ended_at,
            runs=tuple(replace(r) for r in ordered),
            error=error,
            producer=producer,
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> JobResult:
        """The result a ``JOB.result.json`` document holds: ``as_dict`` read back.

        ``as_dict(from_dict(d)) == d`` for every document ``as_dict`` writes; its
        ``summary`` and ``duration_s`` are not read, they follow from the runs and times.

        Raises:
            ValueError: ``data`` is not a result document (a field missing or of the wrong kind).
        """
        try:
            return cls(
                job_id=data["job_id"],
                status=JobStatus(data["status"]),
                started_at=datetime.fromisoformat(data["started_at"]),
                ended_at=datetime.fromisoformat(data["ended_at"]),
                runs=tuple(RunRecord.from_dict(run) for run in data["runs"]),
                error=data["error"],
                producer=data["producer"],
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a result document: {type(exc).__name__}: {exc}") from exc

    @property
    def summary(self) -> Summary:
        """The counts and sentence of the runs."""
        return Summary.of(self.runs)

    @property
    def duration_s(self) -> float:
        """Seconds from start to end, to the millisecond."""
        return round((self.ended_at - self.started_at).total_seconds(), 3)

    def as_dict(self) -> dict[str, Any]:
        """The JSON form written to ``JOB.result.json``."""
        document = self.document()
        document["runs"] = list(document["runs"])
        return document

    def document(self) -> dict[str, Any]:
        """``as_dict`` with ``runs`` an iterator whose entries are made as they are read.

        What the daemon writes: a 100,000-run result is never whole in memory.
        """
        return {
            "job_id": self.job_id,
            "status": self.status.value,
            "producer": self.producer,
            "started_at": _iso(self.started_at),
            "ended_at": _iso(self.ended_at),
            "duration_s": self.duration_s,
            "summary": self.summary.as_dict(),
            "error": self.error,
            "runs": (r.as_dict() for r in self.runs),
        }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def _time(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None
