"""The journal: durable appends and a replay that survives a torn last record (no server)."""

from __future__ import annotations

from pathlib import Path

from flowsubmit._types import RunSnapshot
from flowsubmit.queue.journal import Journal, replay, snapshot_record


def test_replay_restores_created_runs_and_finals(tmp_path: Path) -> None:
    """Records appended are what replay returns."""
    journal, state = Journal.open(tmp_path / "j.journal")
    assert state.created == {} and state.job_id is None
    journal.append("claimed", job_id="job-1", source="a.json")
    journal.append("created", stage=0, index=2, attempt=1, flow_run_id="run-a")
    journal.append(
        "final",
        **snapshot_record(
            RunSnapshot("run-a", "FAILED", "TimedOut", flow_run_name="n", state_id="s1")
        ),
    )
    journal.close()

    state = replay(tmp_path / "j.journal")
    assert state.job_id == "job-1"
    assert state.created == {(0, 2, 1): "run-a"}
    assert state.finals["run-a"] == RunSnapshot(
        "run-a", "FAILED", "TimedOut", flow_run_name="n", state_id="s1", source="journal"
    )


def test_a_torn_last_record_is_ignored(tmp_path: Path) -> None:
    """A crash mid-write leaves a partial line; replay keeps everything before it."""
    path = tmp_path / "j.journal"
    journal, _ = Journal.open(path)
    journal.append("created", stage=0, index=0, attempt=0, flow_run_id="run-a")
    journal.close()
    with path.open("ab") as fh:
        fh.write(b'{"rec":"created","stage":0,"index":1,"att')
    assert replay(path).created == {(0, 0, 0): "run-a"}


def test_missing_journal_replays_empty(tmp_path: Path) -> None:
    """A job claimed just before a crash may have no journal yet."""
    state = replay(tmp_path / "absent.journal")
    assert (state.job_id, state.created, state.finals) == (None, {}, {})
