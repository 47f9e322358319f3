"""The journal: durable appends and a replay that survives a torn last record (no server)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from flowsubmit._types import RunSnapshot
from flowsubmit.queue.journal import SYNC_DELAY_S, Journal, replay, snapshot_record


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


async def test_records_of_one_sync_delay_share_one_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a loop, the records appended within ``SYNC_DELAY_S`` are fsynced once, after it;
    each is in the file (a killed process keeps it) once the loop turn that appended it ends."""
    real_fsync, synced = os.fsync, []

    def counting_fsync(fd: int) -> None:  # a spy: the real fsync still runs
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    path = tmp_path / "j.journal"
    journal, _ = Journal.open(path)
    for index in range(50):
        journal.append("created", stage=0, index=index, attempt=0, flow_run_id=f"run-{index}")
        await asyncio.sleep(0)  # each record in a turn of its own, as final events come
    assert len(replay(path).created) == 50 and synced == []
    await asyncio.sleep(SYNC_DELAY_S * 2)
    assert len(synced) == 1
    journal.append("created", stage=0, index=50, attempt=0, flow_run_id="run-50")
    journal.close()  # fsyncs what is pending at once, and no timer fires on a closed file
    assert len(synced) == 2
    await asyncio.sleep(SYNC_DELAY_S * 2)
    assert len(synced) == 2


async def test_the_records_of_one_loop_turn_are_written_in_one_write_after_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst of finals recorded in one turn costs one write, right after the turn; outside a
    loop a record is in the file when ``append`` returns."""
    real_write, writes = os.write, []

    def counting_write(fd: int, data: bytes) -> int:  # a spy: the real write still runs
        writes.append(fd)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", counting_write)
    path = tmp_path / "j.journal"
    journal, _ = Journal.open(path)
    for index in range(20):
        journal.append("created", stage=0, index=index, attempt=0, flow_run_id=f"run-{index}")
    assert (len(replay(path).created), len(writes)) == (0, 0)
    await asyncio.sleep(0)
    assert (len(replay(path).created), len(writes)) == (20, 1)
    await asyncio.to_thread(
        journal.append, "created", stage=0, index=20, attempt=0, flow_run_id="run-20"
    )
    assert (len(replay(path).created), len(writes)) == (21, 2)
    journal.append("created", stage=0, index=21, attempt=0, flow_run_id="run-21")
    journal.close()  # what the turn appended is written before the file closes
    assert replay(path).created[(0, 21, 0)] == "run-21"
