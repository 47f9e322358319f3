"""Runs nobody will execute are named before anyone waits for them (the real server)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flowsubmit.engine.runset import job_tag
from flowsubmit.local.localserver import LocalServer
from tests.support import ROOT
from tests.support.daemons import Daemon, enqueue, result_of, status
from tests.support.driver import drive, late, start, wait_for_runs
from tests.support.flows import DRIVEN, ETL
from tests.support.jobs import make_job


def _enqueue(queue: Path, *flags: str) -> list[str]:
    """``flowsubmit enqueue --create`` of a job on standard input, into ``queue``."""
    command = [sys.executable, "-m", "flowsubmit.cli", "enqueue", "--create", "--queue", str(queue)]
    return [*command, *flags, "-"]


def test_enqueue_check_warns_of_a_deployment_no_worker_polls(
    served: LocalServer, tmp_path: Path
) -> None:
    """``--check``: a deployment nobody serves (Prefect: NOT_READY) draws one warning; a served one none; both are enqueued."""
    seen = {}
    for deployment in (DRIVEN, ETL):
        done = subprocess.run(
            _enqueue(tmp_path / "q", "--check"),
            input=json.dumps({"deployment": deployment, "runs": [{"parameters": {"table": 1}}]}),
            capture_output=True,
            text=True,
            env=served.env(),
            cwd=ROOT,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        seen[deployment] = done.stderr.splitlines()
    assert seen[DRIVEN] == [
        f"flowsubmit: warning: deployment {DRIVEN!r} is NOT_READY in Prefect: no worker or runner"
        " has polled it lately, so its runs will wait Scheduled (then Late) until one does"
    ]
    assert seen[ETL] == []


def test_enqueue_wait_warns_at_once_when_no_daemon_serves_the_queue(
    served: LocalServer, tmp_path: Path
) -> None:
    """``--wait`` on a queue without a daemon: the first stderr line says so, while it waits."""
    queue = tmp_path / "q"
    process = subprocess.Popen(
        _enqueue(queue, "--wait"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=served.env(),
        cwd=ROOT,
    )
    assert process.stdin is not None and process.stderr is not None
    process.stdin.write(json.dumps({"deployment": DRIVEN, "runs": [{}]}))
    process.stdin.close()
    # Without the warning it would wait for ever: killed after 60 s, its stderr then ends.
    guard = threading.Timer(60, process.kill)
    guard.start()
    try:
        first = process.stderr.readline()
    finally:
        guard.cancel()
        process.kill()
        process.wait()
    assert first == (
        f"flowsubmit: warning: no daemon serves {queue} (no heartbeat file from this host);"
        " the job waits in incoming/ until a daemon serves this queue\n"
    )


def _running_job(env: dict[str, str], queue: Path, job_id: str) -> dict[str, Any] | None:
    """The job's entry in ``status --json``, while it runs."""
    jobs = [j for j in json.loads(status(env, queue, "--json"))["jobs"] if j["job_id"] == job_id]
    return jobs[0] if jobs else None


def test_late_runs_are_counted_late_and_warned_of_once_per_job(
    served: LocalServer, start_daemon: Callable[..., Daemon]
) -> None:
    """Runs nobody executes: ``status`` counts them scheduled, then late, and the job logs one ``job.runs_late``.

    The session server's late-runs service is off: the test marks runs Late as it would.
    """
    daemon = start_daemon()
    job_id = enqueue(daemon.queue, make_job(deployment=DRIVEN, runs=4))
    run_ids = sorted(asyncio.run(wait_for_runs(job_tag(job_id), 4)))

    def split() -> tuple[int, ...] | None:
        return _split(served, daemon.queue, job_id)

    assert daemon.wait_for(lambda: split() == (4, 0, 0), what="4 runs scheduled")
    asyncio.run(late(run_ids[:2]))
    asyncio.run(start(run_ids[2:3]))
    daemon.wait_for(lambda: split() == (1, 2, 1), what="2 runs late, 1 running, 1 scheduled")
    warnings = daemon.events("job.runs_late")
    assert [(w["level"], w["job_id"], w["deployment"], w["work_pool"]) for w in warnings] == [
        ("warning", job_id, DRIVEN, None)
    ]
    assert warnings[0]["hint"] == (
        "no worker or runner polls it: start one, or check the work pool"
    )
    assert warnings[0]["flow_run_id"] in run_ids[:2]
    asyncio.run(drive(run_ids))
    daemon.wait_for(lambda: result_of(daemon.queue, job_id), what="the job's end")
    assert len(daemon.events("job.runs_late")) == 1


def test_a_restarted_daemon_learns_which_runs_turned_late_while_it_was_stopped(
    served: LocalServer, start_daemon: Callable[..., Daemon]
) -> None:
    """Runs that turned Late or started while no daemon listened are counted so by the daemon that adopts the job.

    It learns them from the server's backfill of the subscription (its last 1,000
    events), or else from its one read of each run the stream has not covered.
    """
    first = start_daemon()
    job_id = enqueue(first.queue, make_job(deployment=DRIVEN, runs=3))
    run_ids = sorted(asyncio.run(wait_for_runs(job_tag(job_id), 3)))
    asyncio.run(late(run_ids[:1]))
    first.wait_for(
        lambda: _split(served, first.queue, job_id) == (2, 1, 0), what="1 run late, 2 scheduled"
    )
    assert first.stop() == 0
    asyncio.run(late(run_ids[1:2]))
    asyncio.run(start(run_ids[2:]))

    second = start_daemon(first.queue)
    second.wait_for(
        lambda: _split(served, first.queue, job_id) == (0, 2, 1), what="2 runs late, 1 running"
    )
    assert len(second.events("job.runs_late")) == 1
    asyncio.run(drive(run_ids))
    second.wait_for(lambda: result_of(second.queue, job_id), what="the job's end")


def _split(served: LocalServer, queue: Path, job_id: str) -> tuple[int, ...] | None:
    """The job's runs not final, as (scheduled, late, running), from ``status --json``."""
    job = _running_job(served.env(), queue, job_id)
    return tuple(job["runs"].get(k, -1) for k in ("scheduled", "late", "running")) if job else None
