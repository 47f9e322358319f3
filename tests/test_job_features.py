"""Job features through the daemon on the real server: retries, stages, timeout and cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

from flowsubmit.cli import main as cli
from tests.support.daemons import Daemon, enqueue, result_of
from tests.support.driver import drive, wait_for_runs
from tests.support.flows import DRIVEN, ETL, SLEEPER


async def _cancel_messages(flow_run_id: str) -> list[tuple[str, str | None]]:
    """The Cancelling and Cancelled states of a run in Prefect's history, with their messages."""
    async with get_client() as client:
        states = await client.read_flow_run_states(UUID(flow_run_id))
    return [
        (state.type.value, state.message)
        for state in states
        if state.type.value in ("CANCELLING", "CANCELLED")
    ]


async def _states_tagged(tag: str) -> list[str]:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
        )
    return sorted(r.state.type.value for r in runs if r.state)


def test_retries_resubmit_a_failed_run_with_a_new_attempt(
    start_daemon: Callable[..., Daemon],
) -> None:
    """With retries=1 a failing run is created once more (new key); the result lists both attempts with the flow's exception text."""
    daemon = start_daemon()
    job_id = enqueue(
        daemon.queue,
        {
            "deployment": ETL,
            "retries": 1,
            "runs": [
                {"parameters": {"table": 1, "fail": True, "seconds": 0}},
                {"parameters": {"table": 2, "seconds": 0}},
            ],
        },
    )

    folder, result = daemon.wait_for(lambda: result_of(daemon.queue, job_id), what="result")

    assert folder == "failed"
    assert [(len(r["attempts"]), r["state_name"]) for r in result["runs"]] == [
        (2, "Failed"),
        (1, "Completed"),
    ]
    failing = result["runs"][0]
    assert "table 1: failing on purpose" in failing["state_message"]
    assert [a["state_name"] for a in failing["attempts"]] == ["Failed", "Failed"]
    assert len({a["flow_run_id"] for a in failing["attempts"]}) == 2
    assert failing["attempts"][-1]["flow_run_id"] == failing["flow_run_id"]
    assert all("failing on purpose" in a["state_message"] for a in failing["attempts"])
    failed_lines = [e for e in daemon.events("run.finished") if e["state_type"] != "COMPLETED"]
    assert [(e["level"], "failing on purpose" in e["state_message"]) for e in failed_lines] == [
        ("warning", True),
        ("warning", True),
    ]
    assert [line["index"] for line in daemon.events("run.retrying")] == [0]
    assert len(daemon.events("run.submitted")) == 3
    assert asyncio.run(_states_tagged(f"flowsubmit-job:{job_id}")) == [
        "COMPLETED",
        "FAILED",
        "FAILED",
    ]


def test_a_stage_starts_only_when_the_one_before_completed(
    start_daemon: Callable[..., Daemon],
) -> None:
    """Stage 1 runs after stage 0 completed in full; after a failed stage, later stages are never created."""
    daemon = start_daemon()
    good = enqueue(
        daemon.queue,
        {
            "deployment": ETL,
            "parameters": {"seconds": 0},
            "stages": [{"matrix": {"table": [1, 2]}}, {"runs": [{"parameters": {"table": 3}}]}],
        },
    )
    bad = enqueue(
        daemon.queue,
        {
            "deployment": ETL,
            "parameters": {"seconds": 0},
            "stages": [
                {"runs": [{"parameters": {"table": 4, "fail": True}}]},
                {"runs": [{"parameters": {"table": 5}}]},
            ],
        },
    )

    folder, result = daemon.wait_for(lambda: result_of(daemon.queue, good), what="staged job")
    assert folder == "done"
    assert [(r["stage"], r["parameters"]["table"], r["state_name"]) for r in result["runs"]] == [
        (0, 1, "Completed"),
        (0, 2, "Completed"),
        (1, 3, "Completed"),
    ]
    stage1_start = result["runs"][2]["start_time"]
    assert all(r["end_time"] <= stage1_start for r in result["runs"][:2])

    folder, result = daemon.wait_for(
        lambda: result_of(daemon.queue, bad), what="failing staged job"
    )
    assert folder == "failed"
    assert [(r["stage"], r["state_name"]) for r in result["runs"]] == [
        (0, "Failed"),
        (1, "NotCreated"),
    ]
    assert result["error"] == "stage 0 did not complete in full; 1 later stage(s) not started"
    assert asyncio.run(_states_tagged(f"flowsubmit-job:{bad}")) == ["FAILED"]


def test_timeout_cancels_the_runs_still_going(start_daemon: Callable[..., Daemon]) -> None:
    """A job past its `timeout` ends timed_out in failed/; its runs that had not ended are cancelled in Prefect."""
    daemon = start_daemon()
    job_id = enqueue(
        daemon.queue,
        {
            "deployment": DRIVEN,
            "timeout": 3,
            "runs": [{"parameters": {"table": 1}}, {"parameters": {"table": 2}}],
        },
    )
    run_ids = asyncio.run(wait_for_runs(f"flowsubmit-job:{job_id}", 2))
    asyncio.run(drive(run_ids[:1]))

    folder, result = daemon.wait_for(lambda: result_of(daemon.queue, job_id), what="timed out job")

    assert (folder, result["status"]) == ("failed", "timed_out")
    assert sorted(r["state_name"] for r in result["runs"]) == ["Cancelled", "Completed"]
    assert [line["state"] for line in daemon.events("run.cancelled")] == ["Cancelled"]
    assert asyncio.run(_states_tagged(f"flowsubmit-job:{job_id}")) == ["CANCELLED", "COMPLETED"]


def test_timeout_stops_a_running_run_and_records_it_cancelled(
    start_daemon: Callable[..., Daemon],
) -> None:
    """A run still executing at the timeout is stopped by its runner; the result records it Cancelled."""
    daemon = start_daemon()
    job_id = enqueue(
        daemon.queue,
        {"deployment": SLEEPER, "timeout": 5, "runs": [{"parameters": {"seconds": 120}}]},
    )

    folder, result = daemon.wait_for(
        lambda: result_of(daemon.queue, job_id), timeout_s=120, what="timed out job"
    )

    assert (folder, result["status"]) == ("failed", "timed_out")
    assert [(r["state_type"], r["state_name"]) for r in result["runs"]] == [
        ("CANCELLED", "Cancelled")
    ]
    assert [line["state"] for line in daemon.events("run.cancelled")] == ["Cancelling"]
    assert asyncio.run(_states_tagged(f"flowsubmit-job:{job_id}")) == ["CANCELLED"]
    # Why: in the result, and on the Cancelling state flowsubmit set in Prefect (the
    # runner then writes its own message on the Cancelled state).
    why = "cancelled by flowsubmit: the job timed out after 5 s (timeout)"
    (run,) = result["runs"]
    assert run["state_message"] == why
    assert run["attempts"][0]["state_message"] == why
    assert ("CANCELLING", why) in asyncio.run(_cancel_messages(run["flow_run_id"]))


def test_cancel_command_stops_a_running_job(start_daemon: Callable[..., Daemon]) -> None:
    """`flowsubmit cancel --wait` returns once the daemon has cancelled the runs and ended the job `cancelled`."""
    daemon = start_daemon()
    job_id = enqueue(
        daemon.queue,
        {"id": "cancel-me", "deployment": DRIVEN, "runs": [{"parameters": {"table": 1}}]},
    )
    asyncio.run(wait_for_runs(f"flowsubmit-job:{job_id}", 1))

    assert cli(["cancel", "--wait", "--queue", str(daemon.queue), job_id]) == 0
    folder, result = result_of(daemon.queue, job_id) or ("not ended", {})

    assert (folder, result["status"]) == ("failed", "cancelled")
    assert [p.name for p in daemon.queue.rglob("*.cancel")] == []  # handled, so removed
    assert [r["state_name"] for r in result["runs"]] == ["Cancelled"]
    assert asyncio.run(_states_tagged(f"flowsubmit-job:{job_id}")) == ["CANCELLED"]
    # Why, in the result. (In Prefect a Scheduled run with no infrastructure skips
    # Cancelling: the server's BypassCancellingFlowRunsWithNoInfra sets its own Cancelled
    # state, without a message; a run that started carries it, as the timeout test shows.)
    why = "cancelled by flowsubmit: the job was cancelled on request (flowsubmit cancel)"
    (run,) = result["runs"]
    assert run["state_message"] == why
