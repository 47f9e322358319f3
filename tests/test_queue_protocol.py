"""The queue's own protocols and small pure rules, without a server: cancel requests, progress, the watcher's filter, masking, the summary."""

from __future__ import annotations

from pathlib import Path

from watchfiles import Change

from flowsubmit.queue.folders import Queue, is_job_name
from flowsubmit.queue.watcher import job_file_changed


def test_cancel_request_round_trip(tmp_path: Path) -> None:
    """A cancel request exists only for a job in processing/, and is seen by cancel_requested."""
    queue = Queue(tmp_path)
    queue.ensure()
    (queue.processing / "j1.json").write_text("{}")
    assert not queue.cancel_requested("j1")
    assert queue.request_cancel("j1")
    assert queue.cancel_requested("j1")
    assert not queue.request_cancel("nope")
    assert not queue.cancel_requested("nope")


def test_progress_reads_the_journal(tmp_path: Path) -> None:
    """progress counts created and finished runs from the journal; an unparsable job has no total."""
    queue = Queue(tmp_path)
    queue.ensure()
    (queue.processing / "j1.json").write_text("not json")
    (queue.processing / "j1.journal").write_text(
        '{"rec":"created","stage":0,"index":0,"attempt":0,"flow_run_id":"r"}\n'
        '{"rec":"final","flow_run_id":"r","state_type":"COMPLETED","state_name":"Completed"}\n'
    )
    progress = queue.progress("j1")
    assert (progress.finished, progress.created, progress.total) == (1, 1, None)


def test_watcher_filter_follows_the_queue_rule() -> None:
    """The watcher wakes for exactly the names the queue scans."""
    for name in ("a.json", ".a.json", "a.json.tmp", "a.json.part", "a.txt", "x.tmp.json"):
        assert job_file_changed(Change.added, f"/q/incoming/{name}") == is_job_name(name)


def test_state_messages_are_masked_like_parameters() -> None:
    """A state message loses the values of secret-like parameters and any `secret=value` it spells out."""
    from flowsubmit.redaction import redact_text

    text = "login failed for hunter2-pw; retry with api_key=abc123 and table=3"
    masked = redact_text(text, {"db_password": "hunter2-pw", "table": 3})
    assert masked == "login failed for ***; retry with api_key=*** and table=3"


def test_summary_names_cancelled_runs() -> None:
    """The summary sentence says how many runs were cancelled, and `failed` does not count them."""
    from flowsubmit._types import RunSnapshot
    from flowsubmit.engine.results import RunRecord, Summary

    def record(state_type: str | None) -> RunRecord:
        run = RunRecord(0, 0, "f/d", {})
        if state_type is not None:
            run.record(RunSnapshot("r", state_type, state_type))
        return run

    summary = Summary.of(
        [record("COMPLETED"), record("FAILED"), *(record("CANCELLED") for _ in range(9))]
    )
    assert summary.line == "Summary → 1/11 succeeded, 1 failed, 9 cancelled"
    assert Summary.of([record("COMPLETED"), record(None)]).line == (
        "Summary → 1/2 succeeded, 1 failed"
    )
