"""The library's log lines: stdlib ``logging`` under ``flowsubmit``, or the Prefect run's logger inside a run.

A plain script decides with its own ``logging`` configuration what shows and how;
each record's message is the sentence alone (``✅ [flow/deployment] Run abc12345
finished with state: Completed``, ``Summary → 18/20 succeeded, 2 failed``) and its
``event`` and fields travel as record attributes (``record.run_id``...). The
submitted run's id is ``run_id``, never ``flow_run_id``: Prefect's log handler
reads that one as the run whose logs the record belongs to.
Inside a Prefect flow or task run the same records go to ``get_run_logger()``, so
they appear in that run's logs in Prefect.

A script that configured no logging at all (no handler on the ``flowsubmit.submission``
logger's path) still sees the lines at ``INFO`` and above, the message alone, on
stderr: ``_UNCONFIGURED`` handles them instead of Python's last-resort handler (which
shows warnings only). Once the application adds a handler anywhere on that path, its
levels and handlers alone decide.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

from flowsubmit._types import RunSnapshot
from flowsubmit.engine.results import RunRecord, Summary
from flowsubmit.engine.tracker import LATE_HINT
from flowsubmit.errors import GatewayError
from flowsubmit.gateway.run_logger import current_run_logger

__all__ = ["LOGGER_NAME", "SubmissionReporter"]

LOGGER_NAME = "flowsubmit.submission"
_log = logging.getLogger(LOGGER_NAME)


class _StderrAtEmit(logging.StreamHandler):  # type: ignore[type-arg]
    """The message alone on whatever ``sys.stderr`` is when a line is written."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(message)s"))
        self.setLevel(logging.INFO)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _: TextIO) -> None:
        """Ignored: the stream is always the current ``sys.stderr``."""


_UNCONFIGURED = _StderrAtEmit()


def _logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run logger inside a Prefect flow or task run, else ``flowsubmit.submission``."""
    return current_run_logger() or _log


def _log_line(level: int, message: str, fields: dict[str, Any]) -> None:
    """Log one line; with no logging configured, show it on stderr (see the module's docstring)."""
    logger = _logger()
    if logger is _log and not _log.hasHandlers():
        record = _log.makeRecord(
            _log.name, level, "(flowsubmit)", 0, message, (), None, extra=fields
        )
        if level >= _UNCONFIGURED.level:
            _UNCONFIGURED.handle(record)
        return
    logger.log(level, message, extra=fields)


class SubmissionReporter:
    """A ``RunReporter`` for one ``FlowSubmission``, and its summary line."""

    def __init__(self, submission_id: str, deployment: str) -> None:
        self._fields = {"submission_id": submission_id, "deployment": deployment}
        self._deployment = deployment

    def _emit(self, level: int, event: str, message: str, **fields: Any) -> None:
        _log_line(level, message, {"event": event, **self._fields, **fields})

    def submitted(self, record: RunRecord, run_id: str) -> None:
        """Nothing: a creation is not news to the script that asked for it."""

    def retrying(self, record: RunRecord, previous: RunSnapshot, run_id: str) -> None:
        self._emit(
            logging.INFO,
            "submission.retrying",
            f"🔁 [{self._deployment}] Run {previous.flow_run_id[:8]} ({previous.state_name})"
            f" submitted again as {run_id[:8]}",
            index=record.index,
            attempt=record.attempts,
            run_id=run_id,
            previous_flow_run_id=previous.flow_run_id,
            state=previous.state_name,
        )

    def finished(self, record: RunRecord, snap: RunSnapshot, message: str) -> None:
        self._emit(
            logging.INFO if snap.succeeded else logging.WARNING,
            "submission.run_finished",
            message,
            index=record.index,
            attempt=record.run_ids.index(snap.flow_run_id) + 1,
            run_id=snap.flow_run_id,
            flow_run_name=snap.flow_run_name,
            state=snap.state_name,
            state_type=snap.state_type,
            state_message=snap.state_message,
            source=snap.source,
        )

    def cancelled(self, record: RunRecord, run_id: str, snap: RunSnapshot | None) -> None:
        self._emit(
            logging.INFO,
            "submission.run_cancelled",
            f"[{self._deployment}] Run {run_id[:8]} cancel requested",
            index=record.index,
            run_id=run_id,
            state=snap and snap.state_name,
        )

    def cancel_failed(self, record: RunRecord, run_id: str, error: GatewayError) -> None:
        self._emit(
            logging.WARNING,
            "submission.cancel_failed",
            f"[{self._deployment}] Run {run_id[:8]} could not be cancelled: {error}",
            index=record.index,
            run_id=run_id,
            error=str(error),
        )

    def runs_late(
        self, record: RunRecord, run_id: str, work_pool: str | None, work_queue: str | None
    ) -> None:
        """Warn that Prefect marked a run Late: nobody picked it up, so ``wait()`` waits on it.

        ``work_pool`` and ``work_queue`` are where it waits (``RunSet.waits_in``); the caller
        warns once per submission (the first Late run), as the daemon does once per job.
        """
        self._emit(
            logging.WARNING,
            "submission.runs_late",
            f"⏰ [{self._deployment}] Run {run_id[:8]} is Late: {LATE_HINT}",
            index=record.index,
            run_id=run_id,
            work_pool=work_pool,
            work_queue=work_queue,
            hint=LATE_HINT,
        )

    def summary(self, summary: Summary) -> None:
        """Log ``Summary → 18/20 succeeded, 2 failed``."""
        self._emit(
            logging.INFO,
            "submission.summary",
            summary.line,
            total=summary.total,
            succeeded=summary.succeeded,
            failed=summary.failed,
            cancelled=summary.cancelled,
            by_state=summary.by_state,
        )
