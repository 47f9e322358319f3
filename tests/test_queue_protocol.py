"""The queue's own protocols, without a server: cancel requests, progress, and the watcher's filter."""

from __future__ import annotations

from pathlib import Path

from watchfiles import Change

from flowsubmit.queue import Queue, is_job_name
from flowsubmit.watcher import job_file_changed


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
