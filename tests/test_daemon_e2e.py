"""The daemon end to end: ``flowsubmit run`` as a subprocess against the real server and served flows."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from tests.support.daemons import Daemon, enqueue, result_of
from tests.support.flows import ETL


async def _server_states(run_ids: list[str]) -> dict[str, tuple[str, dict[str, object]]]:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
        )  # type: ignore[arg-type]
    return {str(r.id): (r.state.type.value if r.state else "", r.parameters) for r in runs}


def test_job_of_five_with_one_failure_lands_in_failed(start_daemon: Callable[..., Daemon]) -> None:
    """A 5-run job with one failing run ends in failed/ with exact per-run results, server truth and JSON logs."""
    daemon = start_daemon()
    job = {
        "deployment": ETL,
        "parameters": {"mode": "quick"},
        "runs": [{"parameters": {"table": t, "fail": t == 3}} for t in range(1, 6)],
    }
    job_id = enqueue(daemon.queue, job)

    folder, result = daemon.wait_for(lambda: result_of(daemon.queue, job_id), what="result")

    assert folder == "failed"
    assert result["job_id"] == job_id
    assert result["status"] == "failed"
    assert result["summary"] == {
        "total": 5,
        "succeeded": 4,
        "failed": 1,
        "cancelled": 0,
        "by_state": {"Completed": 4, "Failed": 1},
        "line": "Summary → 4/5 succeeded, 1 failed",
    }
    runs = result["runs"]
    assert [r["parameters"] for r in runs] == [
        {"mode": "quick", "table": t, "fail": t == 3} for t in range(1, 6)
    ]
    assert [r["state_type"] for r in runs] == [
        "COMPLETED",
        "COMPLETED",
        "FAILED",
        "COMPLETED",
        "COMPLETED",
    ]
    assert all(len(r["attempts"]) == 1 and r["flow_run_name"] and r["end_time"] for r in runs)
    on_server = asyncio.run(_server_states([r["flow_run_id"] for r in runs]))
    assert {rid: state for rid, (state, _) in on_server.items()} == {
        r["flow_run_id"]: r["state_type"] for r in runs
    }
    assert {rid: params["table"] for rid, (_, params) in on_server.items()} == {
        r["flow_run_id"]: r["parameters"]["table"] for r in runs
    }

    finished = daemon.events("run.finished")
    assert sorted(line["flow_run_id"] for line in finished) == sorted(
        r["flow_run_id"] for r in runs
    )
    assert all(
        line["job_id"] == job_id and line["deployment"] == ETL and line["flow_run_name"]
        for line in finished
    )
    (summary,) = daemon.events("job.summary")
    assert summary["message"] == "Summary → 4/5 succeeded, 1 failed"
    assert (summary["total"], summary["succeeded"], summary["failed"]) == (5, 4, 1)
    assert daemon.stop() == 0
    assert all("timestamp" in line and "level" in line for line in daemon.lines())


def test_bad_jobs_are_rejected_and_the_daemon_goes_on(start_daemon: Callable[..., Daemon]) -> None:
    """Malformed JSON, an unknown key, an unknown deployment and refused parameters go to rejected/; a good job still runs."""
    daemon = start_daemon()
    incoming = daemon.queue / "incoming"
    (incoming / "broken.json").write_text('{"deployment": ')
    (incoming / "typo.json").write_text(json.dumps({"deployment": ETL, "runz": [{}]}))
    (incoming / "nowhere.json").write_text(
        json.dumps({"deployment": "no-such-flow/nope", "runs": [{}]})
    )
    (incoming / "badparams.json").write_text(
        json.dumps({"deployment": ETL, "runs": [{"parameters": {"table": "seven"}}]})
    )
    good = enqueue(daemon.queue, {"deployment": ETL, "runs": [{"parameters": {"table": 1}}]})

    daemon.wait_for(lambda: result_of(daemon.queue, good), what="good job")
    daemon.wait_for(
        lambda: len(list((daemon.queue / "rejected").glob("*.error.json"))) == 4,
        what="4 rejections",
    )

    errors = {
        p.name.removesuffix(".error.json"): json.loads(p.read_text())
        for p in (daemon.queue / "rejected").glob("*.error.json")
    }
    assert set(errors) == {"broken.json", "typo.json", "nowhere.json", "badparams.json"}
    assert errors["broken.json"]["reason"].startswith("not valid JSON")
    assert (
        errors["typo.json"]["field"],
        errors["typo.json"]["reason"],
        errors["typo.json"]["hint"],
    ) == ("runz", "unknown key", "did you mean 'runs'?")
    assert (
        errors["nowhere.json"]["field"] == "deployment"
        and "no-such-flow/nope" in errors["nowhere.json"]["reason"]
    )
    assert (
        errors["badparams.json"]["field"] == "parameters.table"
        and "seven" in errors["badparams.json"]["reason"]
    )
    assert all((daemon.queue / "rejected" / name).exists() for name in errors)
    assert sorted(line["file"] for line in daemon.events("job.rejected")) == sorted(errors)
    assert result_of(daemon.queue, good)[0] == "done"  # type: ignore[index]
