"""Crash safety and exactly-once: kill -9 at every step of a job, SIGTERM, Prefect outages, two daemons.

Runs belong to the never-served ``driven`` deployment and are moved through their
states by ``BackgroundDriver`` (real server, real events), so a 30-run job takes seconds.
The kill points are deterministic: the hidden test setting ``FLOWSUBMIT_TEST_CRASH_AT``
makes the daemon SIGKILL itself right after a named durable step (``faults.POINTS``).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from flowsubmit.engine.runset import job_tag
from flowsubmit.errors import ClaimLost
from flowsubmit.local.localserver import LocalServer
from flowsubmit.queue.folders import Queue
from flowsubmit.queue.journal import Journal, replay
from flowsubmit.queue.locking import JobLock
from tests.support import ROOT
from tests.support.crashkit import BackgroundDriver, server_runs
from tests.support.daemons import Daemon, result_of
from tests.support.flows import DRIVEN
from tests.support.jobs import make_job

RUNS = 30


def drop(queue: Path, job: dict[str, Any]) -> str:
    """Drop a job the way ``flowsubmit enqueue`` does (tmp/ then one rename), in-process."""
    q = Queue(queue)
    q.ensure()
    q.enqueue(json.dumps(job).encode(), job["id"])
    return str(job["id"])


def assert_exactly_once(
    queue: Path, job_id: str, runs: int = RUNS, server: LocalServer | None = None
) -> dict[str, Any]:
    """The job is in done/ with ``runs`` completed runs, and the server holds exactly those runs."""
    found = result_of(queue, job_id)
    assert found is not None
    folder, result = found
    assert folder == "done"
    assert result["status"] == "succeeded"
    assert result["summary"]["total"] == runs and result["summary"]["succeeded"] == runs
    assert [(r["index"], r["parameters"]) for r in result["runs"]] == [
        (t, {"table": t}) for t in range(runs)
    ]
    assert {r["state_type"] for r in result["runs"]} == {"COMPLETED"}
    on_server = server_runs(job_tag(job_id), server)
    assert len(on_server) == runs
    assert sorted(r.parameters["table"] for r in on_server) == list(range(runs))
    assert {str(r.id) for r in on_server} == {r["flow_run_id"] for r in result["runs"]}
    assert len({r.idempotency_key for r in on_server}) == runs
    assert os.listdir(queue / "processing") == []
    journal = replay(queue / "done" / f"{job_id}.journal")
    assert (len(journal.created), len(journal.finals)) == (runs, runs)
    return result


# -- kill -9 ---------------------------------------------------------------------------------------

CRASH_POINTS = [
    pytest.param("claimed", id="before-any-submit"),
    pytest.param("created:15", id="mid-submission"),
    pytest.param("created:30", id="after-all-submits"),
    pytest.param("final:10", id="after-some-finals"),
    pytest.param("finish.result", id="finalization-result-written"),
    pytest.param("finish.moved", id="finalization-job-moved"),
]


@pytest.mark.parametrize("point", CRASH_POINTS)
def test_kill_9_then_restart_finishes_the_job_exactly_once(
    start_daemon: Callable[..., Daemon], point: str
) -> None:
    """Killed with SIGKILL at a step of a 30-run job, a restarted daemon ends it in done/ with each run created once."""
    kill_9_then_restart(start_daemon, point)


def kill_9_then_restart(
    start_daemon: Callable[..., Daemon], point: str, server: LocalServer | None = None
) -> None:
    """Kill the daemon at ``point`` of a 30-run job, restart it, and check the job ended exactly once.

    ``server`` is where the runs are driven and counted (the session server when None).
    """
    job_id = f"crash-{point.replace(':', '-')}-{uuid.uuid4().hex[:8]}"
    with BackgroundDriver(job_tag(job_id), server=server):
        first = start_daemon(test_crash_at=point, submit_batch_size=10)
        drop(first.queue, make_job(id=job_id, deployment=DRIVEN, runs=RUNS))
        assert first.process.wait(90) == -signal.SIGKILL
        journal = replay(first.queue / "processing" / f"{job_id}.journal")
        if point == "created:15":
            # Runs were created in Prefect that the journal never heard of: the restart
            # must find them by idempotency key instead of creating them again.
            assert len(journal.created) == 15
            assert len(server_runs(job_tag(job_id), server)) > 15
        second = start_daemon(first.queue)
        second.wait_for(lambda: result_of(second.queue, job_id), what="result")
        if point == "finish.moved":
            second.wait_for(lambda: not os.listdir(second.queue / "processing"), what="cleanup")
        assert second.stop() == 0

    assert_exactly_once(first.queue, job_id, server=server)
    recovered = [line for line in second.events("job.claimed") if line["job_id"] == job_id]
    retired = [line["job_id"] for line in second.events("job.journal_retired")]
    if point == "finish.moved":
        assert (recovered, retired) == ([], [job_id])  # already committed: only tidied up
    else:
        assert [(line["recovered"], line["runs"]) for line in recovered] == [(True, RUNS)]


# -- SIGTERM -------------------------------------------------------------------------------------


def test_sigterm_mid_job_exits_0_and_a_restart_finishes_without_duplicates(
    start_daemon: Callable[..., Daemon],
) -> None:
    """SIGTERM mid-job exits 0 leaving the job in processing/ unlocked; the next start finishes it exactly once."""
    job_id = f"sigterm-{uuid.uuid4().hex[:8]}"
    with BackgroundDriver(job_tag(job_id)):
        first = start_daemon(drain_timeout_s=5)
        drop(first.queue, make_job(id=job_id, deployment=DRIVEN, runs=RUNS))
        first.wait_for_event("run.finished", count=5)
        assert first.stop() == 0
        processing = first.queue / "processing"
        assert sorted(os.listdir(processing)) == [f"{job_id}.journal", f"{job_id}.json"]
        assert result_of(first.queue, job_id) is None
        (stopping,) = first.events("service.stopping")
        assert stopping["running"] == 1
        # The lock is free again: another process could adopt the job right now.
        JobLock.acquire(processing / f"{job_id}.lock").release()

        second = start_daemon(first.queue)
        second.wait_for(lambda: result_of(second.queue, job_id), what="result")
        assert second.stop() == 0

    assert_exactly_once(first.queue, job_id)
    (claimed,) = second.events("job.claimed")
    assert (claimed["job_id"], claimed["recovered"]) == (job_id, True)


# -- exactly-once ids ----------------------------------------------------------------------------


def test_dropping_a_finished_job_id_again_creates_no_run(
    start_daemon: Callable[..., Daemon],
) -> None:
    """A job whose explicit id already finished is rejected as a duplicate naming the earlier job; no run is created."""
    job_id = f"again-{uuid.uuid4().hex[:8]}"
    with BackgroundDriver(job_tag(job_id)):
        daemon = start_daemon()
        drop(daemon.queue, make_job(id=job_id, deployment=DRIVEN, runs=2))
        daemon.wait_for(lambda: result_of(daemon.queue, job_id), what="result")
        drop(daemon.queue, make_job(id=job_id, deployment=DRIVEN, runs=2))
        error_file = daemon.queue / "rejected" / f"{job_id}.json.error.json"
        daemon.wait_for(error_file.exists, what="rejection")
        assert daemon.stop() == 0

    assert json.loads(error_file.read_text()) == {
        "file": f"{job_id}.json",
        "reason": f"duplicate job id: {job_id!r} already ran as done/{job_id}.json",
        "field": "id",
        "hint": "an id makes a job exactly-once; drop it without `id`, or with a new one, to run it again",
    }
    assert_exactly_once(daemon.queue, job_id, runs=2)
    assert [line["job_id"] for line in daemon.events("job.claimed")] == [job_id]


# -- two daemons ---------------------------------------------------------------------------------


def test_two_daemons_on_one_queue_run_each_of_100_jobs_exactly_once(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """100 one-run jobs dropped at once into a queue two daemons share each end once, in one result, with one run."""
    two_daemons_run_each_job_once(start_daemon, tmp_path / "queue", 100)


def two_daemons_run_each_job_once(
    start_daemon: Callable[..., Daemon], queue: Path, jobs: int, server: LocalServer | None = None
) -> None:
    """Drop ``jobs`` one-run jobs into a queue two daemons share; check each ran once, with one run.

    ``server`` is where the runs are driven and counted (the session server when None).
    """
    tag = f"pair-{uuid.uuid4().hex[:8]}"
    ids = [f"{tag}-{n:03d}" for n in range(jobs)]
    settings = {"max_concurrent_jobs": 30}
    with BackgroundDriver(tag, server=server):
        daemons = [start_daemon(queue, **settings), start_daemon(queue, **settings)]
        for job_id in ids:
            drop(queue, make_job(id=job_id, deployment=DRIVEN, runs=1, tags=[tag]))
        daemons[0].wait_for(
            lambda: all(result_of(queue, job_id) for job_id in ids),
            timeout_s=120,
            what=f"{jobs} results",
        )
        assert [d.stop() for d in daemons] == [0, 0]

    claims = Counter(line["job_id"] for d in daemons for line in d.events("job.claimed"))
    assert claims == Counter(ids)
    finished = Counter(line["job_id"] for d in daemons for line in d.events("job.finished"))
    assert finished == Counter(ids)
    assert sorted(os.listdir(queue / "done")) == sorted(
        f"{job_id}{suffix}" for job_id in ids for suffix in (".json", ".journal", ".result.json")
    )
    assert os.listdir(queue / "processing") == os.listdir(queue / "failed") == []
    on_server = {str(r.id): r for r in server_runs(tag, server)}
    assert len(on_server) == jobs
    for job_id in ids:
        (run,) = json.loads((queue / "done" / f"{job_id}.result.json").read_text())["runs"]
        assert job_tag(job_id) in on_server[run["flow_run_id"]].tags


# -- Prefect outages (a separate server, stopped and started by the tests) ------------------------


@pytest.fixture(scope="module")
def other_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A second Prefect server with the ``driven`` deployment registered, for outage tests."""
    server = LocalServer(home=tmp_path_factory.mktemp("other-prefect"))
    try:
        server.start()  # inside the try: a start that times out must not leave the server running
        subprocess.run(
            [
                sys.executable,
                "-c",
                "from tests.support.flows import _deployment, driven; _deployment(driven, 'driven-deployment').apply()",
            ],
            env=server.env(),
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        yield server
    finally:
        server.close()


def test_outage_beyond_tolerance_fails_the_job_with_a_clear_reason(
    other_server: LocalServer, spawn: Callable[..., Daemon]
) -> None:
    """Prefect gone mid-job for longer than prefect_outage_tolerance_s: the job ends in failed/ saying why."""
    if other_server.process is None:
        other_server.start()
    job_id = f"outage-{uuid.uuid4().hex[:8]}"
    daemon = spawn(other_server.env(), prefect_outage_tolerance_s=3)
    daemon.wait_for_event("service.ready")
    drop(daemon.queue, make_job(id=job_id, deployment=DRIVEN, runs=3))
    submitted = daemon.wait_for_event("run.submitted", count=3)
    other_server.stop()

    folder, result = daemon.wait_for(lambda: result_of(daemon.queue, job_id), what="result")
    assert daemon.stop() == 0

    reason = "Prefect unreachable for more than 3 s (prefect_outage_tolerance_s)"
    assert (folder, result["status"], result["error"]) == ("failed", "failed", reason)
    assert [(r["index"], r["flow_run_id"], r["state_type"]) for r in result["runs"]] == sorted(
        (line["index"], line["flow_run_id"], None) for line in submitted
    )
    assert result["summary"]["by_state"] == {"NotFinished": 3}
    assert [(e["job_id"], e["reason"]) for e in daemon.events("job.aborted")] == [
        (job_id, "Prefect unreachable for more than 3 s")
    ]
    (finished,) = daemon.events("job.finished")
    assert (finished["status"], finished["error"]) == ("failed", reason)


def test_prefect_down_at_start_then_up_20_s_later_runs_the_queued_job(
    other_server: LocalServer, spawn: Callable[..., Daemon]
) -> None:
    """A daemon started while Prefect is down claims nothing, then runs the queued job once Prefect is up."""
    other_server.stop()
    job_id = f"late-{uuid.uuid4().hex[:8]}"
    daemon = spawn(other_server.env())
    started = time.monotonic()
    drop(daemon.queue, make_job(id=job_id, deployment=DRIVEN, runs=3))
    daemon.wait_for_event("service.waiting_for_prefect", count=2)
    assert os.listdir(daemon.queue / "incoming") == [f"{job_id}.json"]
    assert os.listdir(daemon.queue / "processing") == []
    time.sleep(max(0.0, 20 - (time.monotonic() - started)))
    other_server.start()

    with BackgroundDriver(job_tag(job_id), server=other_server):
        daemon.wait_for(lambda: result_of(daemon.queue, job_id), what="result")
    assert daemon.stop() == 0

    folder, result = result_of(daemon.queue, job_id)  # type: ignore[misc]
    assert (folder, result["summary"]["succeeded"]) == ("done", 3)
    on_server = server_runs(job_tag(job_id), server=other_server)
    assert {str(r.id) for r in on_server} == {r["flow_run_id"] for r in result["runs"]}
    assert len(daemon.events("service.ready")) == 1


# -- recovery pieces, no server ------------------------------------------------------------------


def test_adopt_refuses_a_job_whose_lock_another_process_holds(tmp_path: Path) -> None:
    """A job in processing/ locked by a live process is not adopted; once that process is gone it is."""
    queue = Queue(tmp_path)
    queue.ensure()
    (queue.processing / "j1.json").write_text("{}")
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT);"
            " fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); sys.stdin.read()",
            str(queue.processing / "j1.lock"),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert holder.stdout is not None and holder.stdout.readline() == b"locked\n"
    with pytest.raises(ClaimLost):
        queue.adopt("j1")
    holder.kill()
    holder.wait()
    claim = queue.adopt("j1")
    assert (claim.job_id, claim.path, claim.state.sha256) == (
        "j1",
        queue.processing / "j1.json",
        None,
    )
    claim.release()


def test_a_journal_stranded_after_the_commit_rename_joins_its_job(tmp_path: Path) -> None:
    """A journal left in processing/ by a crash after the job reached done/ is moved next to it."""
    queue = Queue(tmp_path)
    queue.ensure()
    journal, _ = Journal.open(queue.processing / "j2.journal")
    journal.append("claimed", job_id="j2", source="j2.json")
    journal.close()
    (queue.processing / "j2.lock").touch()
    (queue.done / "j2.json").write_text("{}")
    (queue.processing / "j3.journal").write_text("")  # no job anywhere: left alone

    assert queue.retire_stranded() == ["j2"]
    assert sorted(os.listdir(queue.processing)) == ["j3.journal"]
    assert sorted(os.listdir(queue.done)) == ["j2.journal", "j2.json"]
    assert replay(queue.done / "j2.journal").job_id == "j2"
