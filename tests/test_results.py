"""A run's one record and its views: the result document read back as itself, a message masked once, a result frozen when made (no server)."""

from __future__ import annotations

import json
import logging
import tracemalloc
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from structlog.testing import capture_logs

from flowsubmit._types import JobStatus, RunSnapshot
from flowsubmit.engine import results
from flowsubmit.engine.results import JobResult, RunRecord, finished_message
from flowsubmit.library_log import SubmissionReporter
from flowsubmit.queue.json_stream import json_chunks
from flowsubmit.service.executor import _JobReporter

T0 = datetime(2026, 11, 30, 3, 0, tzinfo=UTC)
SECRETS = ("hunter2-pw", "abc123", "t0ken-value")


def _at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def _records() -> list[RunRecord]:
    """Four runs of two stages: retried to success, retry left unfinished, not created, never tried."""
    retried = RunRecord(0, 0, "etl/etl", {"table": 1, "db_password": "hunter2-pw"})
    retried.add_run("run-a1")
    retried.record(
        RunSnapshot(
            "run-a1",
            "FAILED",
            "Failed",
            flow_run_name="brave-fox",
            start_time=_at(1),
            end_time=_at(2),
            state_message="login failed for hunter2-pw; retry with api_key=abc123",
        )
    )
    retried.add_run("run-a2")  # an event's final: no name, no start time, no message
    retried.record(RunSnapshot("run-a2", "COMPLETED", "Completed", end_time=_at(4), source="event"))
    unfinished = RunRecord(0, 1, "etl/etl", {"table": 2})
    unfinished.add_run("run-b1")
    unfinished.record(RunSnapshot("run-b1", "CRASHED", "Crashed", flow_run_name="calm-owl"))
    unfinished.add_run("run-b2")
    refused = RunRecord(1, 0, "etl/load", {"token": "t0ken-value"})
    refused.creation_failed("HTTP 422: bad token=t0ken-value")
    untried = RunRecord(1, 1, "etl/load", {"nested": {"api_key": "abc123"}})
    return [untried, refused, unfinished, retried]


def _result(records: list[RunRecord]) -> JobResult:
    return JobResult.of(
        job_id="nightly-1",
        status=JobStatus.FAILED,
        started_at=T0,
        ended_at=_at(9.1234),
        records=records,
        error="stage 0 did not complete in full; 1 later stage(s) not started",
        producer={"uid": 1001, "user": "etl"},
    )


def _written(result: JobResult) -> dict[str, Any]:
    """The document as a reader of ``JOB.result.json`` finds it."""
    document: dict[str, Any] = json.loads(json.dumps(result.as_dict()))
    return document


def test_a_result_document_reads_back_as_itself() -> None:
    """from_dict then as_dict gives the document again: retries, an unfinished retry, a run not created, secrets, None fields."""
    document = _written(_result(_records()))

    assert JobResult.from_dict(document).as_dict() == document
    assert document["summary"]["line"] == "Summary → 1/4 succeeded, 3 failed"
    assert document["runs"][0] == {
        "stage": 0,
        "index": 0,
        "deployment": "etl/etl",
        "parameters": {"table": 1, "db_password": "***"},
        "flow_run_id": "run-a2",
        "flow_run_name": "brave-fox",
        "state_name": "Completed",
        "state_type": "COMPLETED",
        "state_message": None,
        "attempts": [
            {
                "flow_run_id": "run-a1",
                "state_name": "Failed",
                "state_type": "FAILED",
                "state_message": "login failed for ***; retry with api_key=***",
                "start_time": "2026-11-30T03:00:01+00:00",
                "end_time": "2026-11-30T03:00:02+00:00",
            },
            {
                "flow_run_id": "run-a2",
                "state_name": "Completed",
                "state_type": "COMPLETED",
                "state_message": None,
                "start_time": None,
                "end_time": "2026-11-30T03:00:04+00:00",
            },
        ],
        "start_time": None,
        "end_time": "2026-11-30T03:00:04+00:00",
        "error": None,
    }
    assert [(r["flow_run_id"], r["state_name"], r["error"]) for r in document["runs"][1:]] == [
        ("run-b2", "Crashed", None),
        (None, "NotCreated", "HTTP 422: bad token=***"),
        (None, None, None),
    ]
    assert not any(secret in json.dumps(document) for secret in SECRETS)


def test_a_result_without_runs_reads_back_as_itself() -> None:
    """A job ended before any run (cancelled while waiting) has a document that reads back too."""
    now = datetime.now(UTC)
    result = JobResult.of(
        job_id="later", status=JobStatus.CANCELLED, started_at=now, ended_at=now, records=[]
    )
    document = _written(result)

    read = JobResult.from_dict(document)
    assert (read.status, read.runs, read.summary.line) == (
        JobStatus.CANCELLED,
        (),
        "Summary → 0/0 succeeded, 0 failed",
    )
    assert read.as_dict() == document


@pytest.mark.parametrize(
    "document",
    [{"status": "succeeded"}, {**_written(_result(_records())), "status": "lost"}, []],
)
def test_what_is_not_a_result_document_is_refused(document: Any) -> None:
    """A document missing a field, with an unknown status, or not an object raises ValueError."""
    with pytest.raises(ValueError, match="result document|is not a valid JobStatus"):
        JobResult.from_dict(document)


def test_a_state_message_is_masked_once_for_the_lines_and_the_result(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The message masked when the final is recorded is the very one in both log lines and the result."""
    masked_texts: list[str] = []
    redact_text = results.redact_text

    def counting(text: str, parameters: Any = None) -> str:
        masked_texts.append(redact_text(text, parameters))
        return masked_texts[-1]

    monkeypatch.setattr(results, "redact_text", counting)
    record = RunRecord(0, 0, "etl/etl", {"db_password": "hunter2-pw"})
    record.add_run("run-1")
    snap = RunSnapshot("run-1", "FAILED", "Failed", state_message="no login for hunter2-pw")
    kept = record.record(snap)
    with capture_logs() as daemon_lines, caplog.at_level(logging.INFO, "flowsubmit"):
        _JobReporter().finished(record, kept, finished_message("etl/etl", kept))
        SubmissionReporter("s1", "etl/etl").finished(
            record, kept, finished_message("etl/etl", kept)
        )
    result = JobResult.of(
        job_id="j", status=JobStatus.FAILED, started_at=T0, ended_at=T0, records=[record]
    )
    run = result.as_dict()["runs"][0]

    (masked,) = masked_texts  # masked once, then only read
    assert masked == "no login for ***"
    (daemon_line,) = daemon_lines
    (library_line,) = caplog.records
    shown = [
        daemon_line["state_message"],
        library_line.state_message,  # type: ignore[attr-defined]
        run["state_message"],
        run["attempts"][0]["state_message"],
    ]
    assert all(message is masked for message in shown)


def test_a_result_keeps_the_runs_as_they_stood_when_made() -> None:
    """A record that changes after its job's result was made (a late final, a new attempt) leaves the result as it was."""
    records = _records()
    result = _result(records)
    before = _written(result)

    unfinished = next(r for r in records if r.index == 1 and r.stage == 0)
    unfinished.record(RunSnapshot("run-b2", "COMPLETED", "Completed", flow_run_name="late"))
    unfinished.add_run("run-b3")

    assert _written(result) == before
    assert result.summary.line == "Summary → 1/4 succeeded, 3 failed"
    assert unfinished.state_name == "Completed"


def _many(count: int) -> list[RunRecord]:
    """``count`` finished runs, with names and messages a JSON writer must escape."""
    records = []
    for i in range(count):
        record = RunRecord(i % 3, i, "etl/étl", {"i": i, "note": 'naïve \ud800 "q"\n'})
        record.add_run(f"run-{i}")
        record.record(
            RunSnapshot(
                f"run-{i}",
                "FAILED" if i % 7 == 0 else "COMPLETED",
                "Failed" if i % 7 == 0 else "Completed",
                flow_run_name=f"fox-{i} ✅",
                start_time=_at(i),
                end_time=_at(i + 1),
                state_message="line one\nline \udcff two" if i % 7 == 0 else None,
            )
        )
        records.append(record)
    return records


def _whole(document: dict[str, Any]) -> bytes:
    """The file as it was written when the document was made whole first."""
    text = json.dumps(document, indent=2, ensure_ascii=False, default=str) + "\n"
    return text.encode("utf-8", "backslashreplace")


@pytest.mark.parametrize("count", [0, 1, 2_000])
def test_a_result_written_as_its_runs_are_read_is_the_same_bytes(count: int) -> None:
    """The daemon writes the runs one entry at a time; the file is byte for byte the whole document's."""
    result = _result(_many(count) + (_records() if count else []))
    assert b"".join(json_chunks(result.document())) == _whole(result.as_dict())


def test_writing_a_big_result_never_holds_it_whole() -> None:
    """Written from ``document()``, a 20,000-run result costs a small fraction of the memory of the whole one."""
    result = _result(_many(20_000))
    tracemalloc.start()
    try:
        for _chunk in json_chunks(result.document()):
            pass
        streamed_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        _whole(result.as_dict())
        whole_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert streamed_peak * 20 < whole_peak, (streamed_peak, whole_peak)
