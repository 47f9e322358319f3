"""The job's life on Prefect's event feed: the documented events, and a real automation reacting to one."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.events.actions import RunDeployment
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

from flowsubmit import flow_submitter
from flowsubmit.local.localserver import LocalServer
from tests.support.daemons import Daemon, enqueue, result_of
from tests.support.driver import drive, wait_for_runs
from tests.support.flows import DRIVEN, ETL
from tests.support.prefect_events import (
    create_deployment,
    job_events,
    runs_of,
    wait_for_artifact,
    wait_for_events,
    within,
)

pytestmark = pytest.mark.server


@pytest.mark.timeout(600)  # run alone on a loaded machine, the session server's start counts here
def test_a_jobs_events_artifact_and_ui_links_are_in_prefect(
    served: LocalServer, spawn: Callable[..., Daemon]
) -> None:
    """claimed then failed on the feed (resource, labels, deployment, payload, never a parameter);
    the artifact flowsubmit-<id> shows the failing run; each run of the result links to the UI."""
    ui = "https://prefect.example.com"
    daemon = spawn(served.env(PREFECT_UI_URL=ui), None, prefect_artifacts=True)
    daemon.wait_for_event("service.ready")
    runs = [{"parameters": {"table": 424242}}, {"parameters": {"table": 424243, "fail": True}}]
    job_id = enqueue(
        daemon.queue, {"id": "nightly", "deployment": ETL, "runs": runs, "priority": 3}
    )
    folder, result = daemon.wait_for(lambda: result_of(daemon.queue, job_id), what="result")
    assert folder == "failed"
    assert [r["ui_url"] for r in result["runs"]] == [
        f"{ui}/runs/flow-run/{r['flow_run_id']}" for r in result["runs"]
    ]

    events = wait_for_events(job_id, {"flowsubmit.job.claimed", "flowsubmit.job.failed"})
    assert [e["event"] for e in events] == ["flowsubmit.job.claimed", "flowsubmit.job.failed"]
    claimed, failed = events
    for event in events:
        resource = event["resource"]
        assert resource["prefect.resource.id"] == f"flowsubmit.job.{job_id}"
        assert resource["prefect.resource.name"] == job_id
        assert resource["flowsubmit.queue"] == str(daemon.queue)
        assert resource["flowsubmit.priority"] == "3"
        assert resource["flowsubmit.producer"]
        (related,) = event["related"]
        assert related["prefect.resource.role"] == "deployment"
        assert related["prefect.resource.name"] == ETL
        assert related["prefect.resource.id"].startswith("prefect.deployment.")
        assert "42424" not in json.dumps(event)  # parameters never leave the result file
    assert claimed["payload"] == {"job_id": job_id, "runs": 2, "recovered": False}
    assert failed["payload"] == {
        "job_id": job_id,
        "status": "failed",
        "summary": result["summary"],
        "result_path": str(daemon.queue / "failed" / f"{job_id}.result.json"),
        "duration_s": result["duration_s"],
        "error": None,
    }

    (artifact,) = asyncio.run(wait_for_artifact(f"flowsubmit-{job_id}"))
    failing = result["runs"][1]
    assert artifact["type"] == "markdown"
    assert artifact["description"] == result["summary"]["line"]
    assert result["summary"]["line"] in artifact["data"]
    assert f"[{failing['flow_run_name']}]({failing['ui_url']})" in artifact["data"]
    # The failing run's state message (the flow's own words), never its parameters.
    assert f"| {' '.join(failing['state_message'].split())} |" in artifact["data"]
    assert "424242" not in artifact["data"]
    assert "outside" not in daemon.log_path.read_text()  # no "outside a flow run" warning


@pytest.fixture(scope="module")
def automations_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    """A Prefect server of its own with the triggers service on (the session server runs without it)."""
    server = LocalServer(
        home=tmp_path_factory.mktemp("automations"),
        server_env={"PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "true"},
    )
    try:
        server.start(timeout_s=240)
        yield server
    finally:
        server.close()


@pytest.mark.timeout(600)
def test_an_automation_runs_the_downstream_deployment_once_when_the_job_completes(
    automations_server: LocalServer, spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    """An automation on flowsubmit.job.completed of one job id runs `report` with the job id as its parameter, once."""
    server = automations_server
    with within(server.api_url):
        upstream = asyncio.run(create_deployment("nightly", "nightly"))
        downstream = asyncio.run(create_deployment("report", "report"))
        automation = AutomationCore(
            name="report after nightly",
            trigger=EventTrigger(
                expect={"flowsubmit.job.completed"},
                match={"prefect.resource.id": "flowsubmit.job.nightly-tables"},
                posture=Posture.Reactive,
                threshold=1,
            ),
            actions=[
                RunDeployment(
                    source="selected",
                    deployment_id=downstream,
                    parameters={"job_id": "{{ event.payload.job_id }}"},
                )
            ],
        )
        automation_id = asyncio.run(_create_automation(automation))

        daemon = spawn(server.env())
        daemon.wait_for_event("service.ready")
        job_id = enqueue(
            daemon.queue,
            {"id": "nightly-tables", "deployment": "nightly/nightly", "runs": [{}]},
            env=server.env(),
        )
        (run_id,) = asyncio.run(wait_for_runs(f"flowsubmit-job:{job_id}", 1))
        asyncio.run(drive([run_id]))
        folder, _ = daemon.wait_for(lambda: result_of(daemon.queue, job_id), what="result")
        assert folder == "done"

        (run,) = asyncio.run(_wait_for_runs(downstream))
        print(json.dumps({k: run[k] for k in ("id", "name", "parameters", "tags")}))
        assert run["parameters"] == {"job_id": job_id}
        # The action is done once it says so; then the downstream run is still the only one.
        asyncio.run(_wait_for_action(automation_id))
        assert [r["id"] for r in asyncio.run(runs_of(downstream))] == [run["id"]]
        assert upstream != downstream


async def _create_automation(automation: AutomationCore) -> str:
    async with get_client() as client:
        return str(await client.create_automation(automation))


async def _wait_for_runs(deployment_id: str, timeout_s: float = 90.0) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout_s):
        while True:
            if runs := await runs_of(deployment_id):
                return runs
            await asyncio.sleep(0.5)


async def _wait_for_action(automation_id: str, timeout_s: float = 60.0) -> None:
    """Until the automation's action-executed event is on the feed."""
    body = {
        "filter": {
            "event": {"name": ["prefect.automation.action.executed"]},
            "resource": {"id": [f"prefect.automation.{automation_id}"]},
        },
        "limit": 10,
    }
    async with get_client() as client, asyncio.timeout(timeout_s):
        while True:
            reply = await client.request("POST", "/events/filter", json=body)  # type: ignore[arg-type]
            if reply.json()["events"]:
                return
            await asyncio.sleep(0.5)


@pytest.mark.timeout(600)
async def test_the_library_sends_the_job_event_when_it_opts_in(served: LocalServer) -> None:
    """flow_submitter(events=True): wait() puts flowsubmit.job.failed for the submission on the feed."""
    submission_id = f"lib-{uuid.uuid4().hex[:8]}"
    runs = flow_submitter(DRIVEN, submission_id=submission_id, events=True)
    first, second = [await runs.submit(table=t) for t in (424242, 424243)]
    await drive([first])
    await drive([second], final="Failed")
    assert await runs.wait() == {first: "Completed", second: "Failed"}

    (event,) = await _wait_for_job_events(submission_id)
    assert event["event"] == "flowsubmit.job.failed"
    assert event["resource"] == {
        "prefect.resource.id": f"flowsubmit.job.{submission_id}",
        "prefect.resource.name": submission_id,
        "flowsubmit.source": "library",
    }
    assert event["related"][0]["prefect.resource.name"] == DRIVEN
    assert event["payload"]["summary"]["line"] == "Summary → 1/2 succeeded, 1 failed"
    assert "42424" not in json.dumps(event)


async def _wait_for_job_events(job_id: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    async with asyncio.timeout(timeout_s):
        while True:
            if events := await job_events(job_id):
                return events
            await asyncio.sleep(0.5)
