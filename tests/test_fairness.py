"""Fair, prioritised submission on the real server: small jobs never wait behind big ones.

Runs belong to the never-served ``driven`` deployment: big jobs' runs stay Scheduled
and are left on the session server (nothing ever starts them; deleting them costs a
loaded SQLite server minutes), and each daemon is stopped as soon as the test has its
answer; the runs of jobs that must finish are moved through their states by
``BackgroundDriver``.
"""

from __future__ import annotations

import signal
import uuid
from collections.abc import Callable
from pathlib import Path

from flowsubmit.engine.runset import job_tag
from flowsubmit.local.localserver import LocalServer
from flowsubmit.queue.journal import replay
from tests.support.crashkit import BackgroundDriver
from tests.support.daemons import Daemon, result_of
from tests.support.flows import DRIVEN
from tests.support.jobs import make_job
from tests.test_crash import assert_exactly_once, drop


def _submitted(daemon: Daemon) -> list[str]:
    """The job id of every ``run.submitted`` line, in log order."""
    return [line["job_id"] for line in daemon.events("run.submitted")]


def test_a_small_job_is_created_while_a_big_one_is_still_submitting(
    start_daemon: Callable[..., Daemon],
) -> None:
    """A 1-run job dropped while a 2,000-run job submits has its run created before the big job's last one."""
    suffix = uuid.uuid4().hex[:8]
    big, small = f"fair-big-{suffix}", f"fair-small-{suffix}"
    daemon = start_daemon()
    try:
        drop(daemon.queue, make_job(id=big, deployment=DRIVEN, runs=2000))
        daemon.wait_for(lambda: big in _submitted(daemon), what="the big job's first run")
        drop(daemon.queue, make_job(id=small, deployment=DRIVEN, runs=1))
        daemon.wait_for(lambda: small in _submitted(daemon), what="the small job's run")
        order = _submitted(daemon)
        big_before_small = order[: order.index(small)].count(big)
        assert 0 < big_before_small < 2000
    finally:
        daemon.stop()


def test_a_higher_priority_job_takes_turns_first(start_daemon: Callable[..., Daemon]) -> None:
    """Dropped while a low-priority job submits, a priority-5 job gets every turn but one in ten until it is done."""
    suffix = uuid.uuid4().hex[:8]
    low, high = f"fair-low-{suffix}", f"fair-high-{suffix}"
    daemon = start_daemon(max_inflight_submissions=1, submit_batch_size=10)
    try:
        drop(daemon.queue, make_job(id=low, deployment=DRIVEN, runs=500))
        daemon.wait_for(lambda: low in _submitted(daemon), what="the low job's first run")
        drop(daemon.queue, make_job(id=high, deployment=DRIVEN, runs=100, priority=5))
        daemon.wait_for(lambda: _submitted(daemon).count(high) == 100, what="the high job's runs")
        order = _submitted(daemon)
        first, last = order.index(high), len(order) - order[::-1].index(high)
        during = order[first:last]
        # 10 turns of the high job; after 9 of them the low job gets one (the relief turn).
        assert during.count(high) == 100
        assert during.count(low) <= 10
        assert order.count(low) < 500  # the low job was still submitting throughout
    finally:
        daemon.stop()


def test_with_every_slot_busy_the_highest_priority_job_is_claimed_next(
    start_daemon: Callable[..., Daemon],
) -> None:
    """With one job slot, busy: of three jobs dropped meanwhile, the priority-5 one (dropped last) is claimed first."""
    suffix = uuid.uuid4().hex[:8]
    tag = f"fair-claims-{suffix}"
    blocker, low1, low2, high = (f"{name}-{suffix}" for name in ("block", "low1", "low2", "high"))
    daemon = start_daemon(max_concurrent_jobs=1, log_level="debug")
    drop(daemon.queue, make_job(id=blocker, deployment=DRIVEN, runs=1, tags=[tag]))
    daemon.wait_for_event("job.claimed")
    drop(daemon.queue, make_job(id=low1, deployment=DRIVEN, runs=1, tags=[tag]))
    drop(daemon.queue, make_job(id=low2, deployment=DRIVEN, runs=1, tags=[tag]))
    drop(daemon.queue, make_job(id=high, deployment=DRIVEN, runs=1, tags=[tag], priority=5))
    # Only judged jobs can be chosen: the slot must not free while one is still being read.
    waiting = daemon.wait_for_event("job.waiting", count=3)
    assert {line["priority"] for line in waiting} == {0, 5}
    with BackgroundDriver(tag):  # the blocker's run ends only now, freeing the slot
        daemon.wait_for(
            lambda: all(result_of(daemon.queue, j) for j in (blocker, low1, low2, high)),
            what="all four jobs",
        )
    assert daemon.stop() == 0
    claimed = [line["job_id"] for line in daemon.events("job.claimed")]
    assert claimed == [blocker, high, low1, low2]


def test_kill_9_in_an_interleaved_submission_then_both_jobs_finish_exactly_once(
    served: LocalServer,
    spawn: Callable[..., Daemon],
    start_daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    """Killed by SIGKILL while two jobs' creates interleave, a restarted daemon ends both with every run created once."""
    suffix = uuid.uuid4().hex[:8]
    big, small = f"fair-crash-big-{suffix}", f"fair-crash-small-{suffix}"
    with BackgroundDriver(job_tag(big)), BackgroundDriver(job_tag(small)):
        # Both wait before the daemon starts, so that its first scan claims both together
        # (files are judged one at a time per producer: a later drop could miss the window).
        drop(tmp_path / "queue", make_job(id=big, deployment=DRIVEN, runs=60))
        drop(tmp_path / "queue", make_job(id=small, deployment=DRIVEN, runs=30))
        first = spawn(
            served.env(),
            tmp_path / "queue",
            test_crash_at="created:30",
            max_inflight_submissions=1,
            submit_batch_size=10,
        )
        assert first.process.wait(90) == -signal.SIGKILL
        journals = {
            job_id: replay(first.queue / "processing" / f"{job_id}.journal").created
            for job_id in (big, small)
        }
        # Both jobs had runs created, neither all of them: the kill hit an interleaving.
        assert 0 < len(journals[big]) < 60 and 0 < len(journals[small]) < 30
        assert len(journals[big]) + len(journals[small]) == 30
        second = start_daemon(first.queue)
        second.wait_for(
            lambda: result_of(second.queue, big) and result_of(second.queue, small),
            what="both results",
        )
        assert second.stop() == 0
    assert_exactly_once(first.queue, big, 60)
    assert_exactly_once(first.queue, small, 30)
