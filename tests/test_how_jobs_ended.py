"""How a job ended, through the daemon on the real server: every run accounted for, and ``status`` says it."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import pytest

from flowsubmit.local.localserver import LocalServer
from tests.support.daemons import Daemon, enqueue, result_of, status
from tests.support.driver import drive, wait_for_runs
from tests.support.flows import DRIVEN


@pytest.fixture(scope="module")
def failed_stage(start_module_daemon: Callable[..., Daemon]) -> tuple[Daemon, str, dict[str, Any]]:
    """A 2-stage job whose stage 0 run failed (driven, with a state message), ended."""
    daemon = start_module_daemon()
    job_id = enqueue(
        daemon.queue,
        {
            "id": "two-stages",
            "deployment": DRIVEN,
            "stages": [{"runs": [{"parameters": {"table": 1}}]}, {"matrix": {"table": [2, 3]}}],
        },
    )
    run_ids = asyncio.run(wait_for_runs(f"flowsubmit-job:{job_id}", 1))
    asyncio.run(drive(run_ids, "Failed"))
    folder, result = daemon.wait_for(lambda: result_of(daemon.queue, job_id), what="job")
    assert folder == "failed"
    return daemon, job_id, result


def test_runs_of_a_stage_never_started_are_listed_and_counted(
    failed_stage: tuple[Daemon, str, dict[str, Any]],
) -> None:
    """Stage 1's two runs are in the result as NotCreated, saying why, and in the summary's total."""
    _, _, result = failed_stage
    assert [(r["stage"], r["state_name"], r["error"]) for r in result["runs"]] == [
        (0, "Failed", None),
        (1, "NotCreated", "not started: stage 0 did not complete in full"),
        (1, "NotCreated", "not started: stage 0 did not complete in full"),
    ]
    assert result["summary"]["line"] == "Summary → 0/3 succeeded, 3 failed"


def test_status_lists_recently_finished_jobs(
    served: LocalServer, failed_stage: tuple[Daemon, str, dict[str, Any]]
) -> None:
    """``status`` and ``status --json`` show the ended job: status, summary, result file."""
    daemon, job_id, _ = failed_stage
    result_path = str(daemon.queue / "failed" / f"{job_id}.result.json")
    (finished,) = json.loads(status(served.env(), daemon.queue, "--json"))["finished"]
    assert {k: finished[k] for k in ("job_id", "status", "summary", "result")} == {
        "job_id": job_id,
        "status": "failed",
        "summary": "Summary → 0/3 succeeded, 3 failed",
        "result": result_path,
    }
    table = status(served.env(), daemon.queue)
    assert "recently finished" in table
    assert any(
        line.split()[:5] == [job_id, "failed", "0/3", "succeeded,", "3"]
        for line in table.splitlines()
    ), table


def test_status_job_id_prints_where_the_job_is_its_failing_runs_and_result(
    served: LocalServer, failed_stage: tuple[Daemon, str, dict[str, Any]]
) -> None:
    """``status JOB_ID``: where it is, its summary, each failing run with its state message, the result path."""
    daemon, job_id, result = failed_stage
    failed_run = result["runs"][0]["flow_run_id"][:8]
    lines = status(served.env(), daemon.queue, job_id).splitlines()
    assert lines == [
        f"{job_id}: failed (failed/)",
        "  Summary → 0/3 succeeded, 3 failed",
        "  stage 0 did not complete in full; 1 later stage(s) not started",
        f"  ❌ stage 0 run 0 ({failed_run}) Failed",
        "  ❌ stage 1 run 0 (no run) NotCreated: not started: stage 0 did not complete in full",
        "  ❌ stage 1 run 1 (no run) NotCreated: not started: stage 0 did not complete in full",
        f"  result: {daemon.queue / 'failed' / f'{job_id}.result.json'}",
    ]


def test_a_timed_out_job_says_so_in_its_error(
    start_module_daemon: Callable[..., Daemon],
) -> None:
    """A job past its ``timeout``: ``timed_out``, and ``error`` says after how long and what became of its runs."""
    daemon = start_module_daemon()
    job_id = enqueue(daemon.queue, {"deployment": DRIVEN, "timeout": 2, "runs": [{}]})
    folder, result = daemon.wait_for(lambda: result_of(daemon.queue, job_id), what="job")
    assert (folder, result["status"]) == ("failed", "timed_out")
    assert result["error"] == "timed out after 2 s (timeout); runs not final were cancelled"
