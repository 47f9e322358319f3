"""Runs nobody will execute are named before anyone waits for them (the real server)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

from flowsubmit.local.localserver import LocalServer
from tests.support import ROOT
from tests.support.flows import DRIVEN, ETL


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
