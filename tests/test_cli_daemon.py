"""The command line with a running daemon and the real server: ``enqueue --check --wait`` reports how the job ended."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Callable

from flowsubmit.local.localserver import LocalServer
from tests.support import ROOT
from tests.support.daemons import Daemon
from tests.support.driver import drive, wait_for_runs
from tests.support.flows import DRIVEN


def _enqueue_and_wait(
    queue: str, job: dict[str, object], env: dict[str, str]
) -> subprocess.Popen[str]:
    """``flowsubmit enqueue --check --wait`` of ``job`` on standard input, left running."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "flowsubmit.cli",
            "enqueue",
            "--check",
            "--wait",
            "--queue",
            queue,
            "-",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert process.stdin is not None
    process.stdin.write(json.dumps(job))
    process.stdin.close()
    return process


def _ended(process: subprocess.Popen[str]) -> tuple[str, str, int]:
    """(stdout, stderr, exit code) once the process has exited (its output is a few lines)."""
    code = process.wait(timeout=120)
    assert process.stdout is not None and process.stderr is not None
    return process.stdout.read(), process.stderr.read(), code


def test_enqueue_wait_exits_0_only_when_every_run_completed(
    served: LocalServer, start_daemon: Callable[..., Daemon]
) -> None:
    """Two jobs under --check --wait: the one whose runs all completed exits 0, the one with a failed run exits 1; both print the summary."""
    daemon = start_daemon()
    jobs = {
        "wait-ok": {"deployment": DRIVEN, "runs": [{"parameters": {"table": 1}}]},
        "wait-bad": {"deployment": DRIVEN, "matrix": {"table": [2, 3]}},
    }
    waiting = {}
    for job_id, job in jobs.items():
        waiting[job_id] = _enqueue_and_wait(str(daemon.queue), {"id": job_id, **job}, served.env())

    async def drive_all() -> None:
        ok = await wait_for_runs("flowsubmit-job:wait-ok", 1)
        bad = await wait_for_runs("flowsubmit-job:wait-bad", 2)
        await drive([*ok, bad[0]])
        await drive(bad[1:], final="Failed")

    asyncio.run(drive_all())
    ended = {job_id: _ended(process) for job_id, process in waiting.items()}

    # The driven deployment has no worker: --check says so (the test drives its runs).
    not_ready = f"flowsubmit: warning: deployment {DRIVEN!r} is NOT_READY in Prefect"
    out, err, code = ended["wait-ok"]
    assert (out, code) == ("wait-ok\nSummary → 1/1 succeeded, 0 failed\n", 0)
    assert [line.startswith(not_ready) for line in err.splitlines()] == [True]
    out, err, code = ended["wait-bad"]
    assert (out, err.splitlines()[1], code) == (
        "wait-bad\nSummary → 1/2 succeeded, 1 failed\n",
        "flowsubmit: job wait-bad: failed (failed/wait-bad.result.json)",
        1,
    )
