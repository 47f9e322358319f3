"""The per-job journal: append-only JSON lines, written once per event-loop turn, fsynced in groups, replayed on recovery."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Self

import orjson

from flowsubmit._turn import TurnFlush
from flowsubmit._types import RunSnapshot
from flowsubmit.errors import ClosedError
from flowsubmit.queue.crashpoints import CrashPoints
from flowsubmit.redaction import redact_text

__all__ = ["Journal", "JournalState"]

#: How long an appended record may wait for its fsync: the records of that span share
#: one. Under the server's own fsyncs one cost about 0.3 ms of blocked event loop, once
#: per final event when each final had its own turn.
SYNC_DELAY_S = 0.1

RunKey = tuple[int, int, int]
"""(stage, index, attempt): one creation of one run of a job."""


@dataclass
class JournalState:
    """What a journal says happened: runs created and final states recorded."""

    job_id: str | None = None
    created: dict[RunKey, str] = field(default_factory=dict)
    finals: dict[str, RunSnapshot] = field(default_factory=dict)
    #: When the job was first claimed (ISO 8601, from the first ``claimed`` record).
    claimed_at: str | None = None
    #: SHA-256 of the job file's bytes as judged (hex); None in a journal from before it was
    #: recorded: every later read of the job file must give these bytes.
    sha256: str | None = None
    #: Who dropped the job (``{"uid": 1001, "user": "etl"}``), as judged at the claim.
    producer: dict[str, Any] | None = None
    #: Runs the job's plan holds, as counted at the claim; None in a journal from before it was
    #: recorded.
    total_runs: int | None = None
    #: The runs not final yet by state (``scheduled``, ``late``, ``running``), as the latest
    #: ``states`` record counted them; None before the first.
    states: dict[str, int] | None = None

    def apply(self, record: dict[str, Any]) -> None:
        """Fold one record into the state; unknown record kinds are ignored (forward compatible)."""
        kind = record.get("rec")
        if kind == "claimed":
            self.job_id = str(record["job_id"])
            self.claimed_at = self.claimed_at or record.get("at")
            if isinstance(record.get("sha256"), str):
                self.sha256 = record["sha256"]
                self.producer = record.get("producer")
            if isinstance(record.get("runs"), int):
                self.total_runs = record["runs"]
        elif kind == "created":
            key = (int(record["stage"]), int(record["index"]), int(record["attempt"]))
            self.created[key] = str(record["flow_run_id"])
        elif kind == "final":
            snap = _snapshot_from(record)
            self.finals[snap.flow_run_id] = snap
        elif kind == "states":
            self.states = {k: int(record[k]) for k in ("scheduled", "late", "running")}

    def run_counts(self) -> dict[str, int]:
        """Runs by where their latest attempt stands: created, not final yet (scheduled,
        late, running), succeeded, failed (FAILED or CRASHED) and cancelled.

        The runs not final yet are counted from the finals; the latest ``states`` record
        splits them, late first, then running, the rest scheduled (a run that ended since
        that record leaves its count; none: all scheduled).
        """
        latest: dict[tuple[int, int], tuple[int, str]] = {}
        for (stage, index, attempt), run_id in self.created.items():
            if (stage, index) not in latest or latest[(stage, index)][0] < attempt:
                latest[(stage, index)] = (attempt, run_id)
        types = [
            self.finals[run_id].state_type if run_id in self.finals else None
            for _, run_id in latest.values()
        ]
        succeeded, cancelled = types.count("COMPLETED"), types.count("CANCELLED")
        waiting = types.count(None)
        split = self.states or {}
        late = min(split.get("late", 0), waiting)
        running = min(split.get("running", 0), waiting - late)
        return {
            "created": len(types),
            "scheduled": waiting - late - running,
            "late": late,
            "running": running,
            "succeeded": succeeded,
            "failed": len(types) - waiting - succeeded - cancelled,
            "cancelled": cancelled,
        }


class Journal:
    """Owns one append-only journal file; the records of an event-loop turn are written after it, together.

    A record is either fully written or absent: asyncio cancellation cannot interrupt
    one half-way. The records appended during one loop turn are written in one
    ``write`` right after it (``TurnFlush``; at once outside a loop); a written
    record survives the process being killed. Against a power loss the file is
    fsynced once for all the records appended within ``SYNC_DELAY_S`` (group commit;
    at once outside a loop, and on ``close``). One fsync per record cost ~6 ms, one
    blocked event loop per created run: a bulk answer of 100 runs waited 0.6 s for
    its journal; one per loop turn still meant one per final event. A record lost
    with the power, or with a kill in the turn that appended it, is safe to lose: a
    ``created`` run is found again by its idempotency key, and a ``final`` one read again.
    """

    def __init__(self, path: Path, *, crash: CrashPoints | None = None) -> None:
        self.path = path
        self._crash = crash or CrashPoints()
        self._fd: int | None = os.open(
            path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o640
        )
        #: Records appended this loop turn, not written yet.
        self._pending: list[bytes] = []
        self._turn = TurnFlush(self._write_pending)
        self._group_commit = TurnFlush(self._sync, delay_s=SYNC_DELAY_S)

    @classmethod
    def open(cls, path: Path, *, crash: CrashPoints | None = None) -> tuple[Self, JournalState]:
        """Open (or create) the journal at ``path`` and return it with its replayed state."""
        state = replay(path)
        return cls(path, crash=crash), state

    def append(self, rec: str, **fields: Any) -> None:
        """Append one record: written after this loop turn, fsynced with the others of its ``SYNC_DELAY_S``."""
        if self._fd is None:
            raise ClosedError(f"journal {self.path} is closed")
        # orjson writes the bytes json.dumps(..., separators=(",", ":")) would, 15x faster.
        self._pending.append(orjson.dumps({"rec": rec, **fields}, option=orjson.OPT_APPEND_NEWLINE))
        self._turn.soon()
        self._group_commit.soon()
        if self._crash.armed:  # test-only fault injection: the record is written when it passes
            self._write_pending()
            self._crash.passed(rec)

    def _write_pending(self) -> None:
        if self._fd is None or not self._pending:
            return
        data, self._pending = b"".join(self._pending), []
        while data:  # a regular file takes it whole, unless the disk is full
            data = data[os.write(self._fd, data) :]

    def _sync(self) -> None:
        """Write what is pending and fsync it (a group commit due after ``close`` finds no file)."""
        if self._fd is not None:
            self._write_pending()
            os.fsync(self._fd)

    def close(self) -> None:
        """Write and fsync what is pending and close the file; idempotent."""
        if self._fd is not None:
            self._sync()
            os.close(self._fd)
            self._fd = None


def replay(path: Path) -> JournalState:
    """Rebuild the state from ``path``; a torn or garbled line (a crash mid-write) is skipped."""
    state = JournalState()
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return state
    for line in lines:
        try:
            record = orjson.loads(line)
            state.apply(record)
        except (ValueError, KeyError, TypeError):
            continue
    return state


def snapshot_record(
    snap: RunSnapshot, parameters: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The fields of a ``final`` record, its state message masked as the result file masks it.

    The journal outlives the job (it moves to ``done/`` or ``failed/`` beside the result),
    so Prefect's message is masked before it is written: any ``name=value`` under a
    secret-like name always, and the values of the run's secret-like ``parameters``
    when the caller passes them.
    """
    message = redact_text(snap.state_message, parameters) if snap.state_message else None
    return {
        "flow_run_id": snap.flow_run_id,
        "flow_run_name": snap.flow_run_name,
        "state_type": snap.state_type,
        "state_name": snap.state_name,
        "state_id": snap.state_id,
        "start_time": snap.start_time,
        "end_time": snap.end_time,
        "source": snap.source,
        "state_message": message,
    }


def _snapshot_from(record: dict[str, Any]) -> RunSnapshot:
    return RunSnapshot(
        flow_run_id=str(record["flow_run_id"]),
        state_type=str(record["state_type"]),
        state_name=str(record["state_name"]),
        flow_run_name=record.get("flow_run_name"),
        state_id=record.get("state_id"),
        start_time=_time(record.get("start_time")),
        end_time=_time(record.get("end_time")),
        source="journal",
        state_message=record.get("state_message"),
    )


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None
