"""The run-set both faces share, against the real server: cancel with a refused cancel, the library's log lines, run_batch, fast failures."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from pathlib import Path

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
from prefect.context import get_run_context
from prefect.logging.handlers import APILogHandler
from prefect.settings import PREFECT_API_URL, PREFECT_LOGGING_TO_API_ENABLED, temporary_settings
from structlog.testing import capture_logs

import flowsubmit
from flowsubmit import TransientGatewayError, WaitTimeout, flow_submitter
from flowsubmit._types import JobStatus
from flowsubmit.engine.runset import job_tag
from flowsubmit.engine.tracker import Tracker
from flowsubmit.errors import JobRejected
from flowsubmit.gateway.client import Gateway
from flowsubmit.jobs.model import parse_job
from flowsubmit.local.localserver import LocalServer, free_port
from flowsubmit.queue.journal import Journal
from flowsubmit.service.executor import Executor
from tests.support.driver import drive, wait_for_runs
from tests.support.flows import DRIVEN

pytestmark = pytest.mark.usefixtures("served")


async def _delete_run(run_id: str) -> None:
    """Remove a run from the server: Prefect then refuses to cancel it (HTTP 404)."""
    async with get_client() as client:
        await client.delete_flow_run(uuid.UUID(run_id))


async def test_library_cancel_goes_on_past_a_refused_cancel() -> None:
    """cancel(): one run Prefect cannot cancel is logged at warning; the others still end Cancelled."""
    runs = flow_submitter(DRIVEN)
    ids = list(await asyncio.gather(*[runs.submit(table=t) for t in range(3)]))
    await _delete_run(ids[1])
    with_logs: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = with_logs.append  # type: ignore[method-assign]
    logging.getLogger("flowsubmit").addHandler(handler)
    try:
        asked = await runs.cancel(grace_s=1.0)
    finally:
        logging.getLogger("flowsubmit").removeHandler(handler)
    assert asked == ids
    assert runs.results == {ids[0]: "Cancelled", ids[2]: "Cancelled"}
    refused = [r for r in with_logs if getattr(r, "event", None) == "submission.cancel_failed"]
    assert [(r.levelno, r.run_id) for r in refused] == [(logging.WARNING, ids[1])]  # type: ignore[attr-defined]
    with pytest.raises(WaitTimeout) as info:
        await runs.wait(timeout=1.0, show_summary=False)
    assert info.value.pending == [ids[1]]


async def test_executor_cancel_goes_on_past_a_refused_cancel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon job's cancel: run.cancel_failed at warning for the refused run, the others end Cancelled."""
    monkeypatch.setattr("flowsubmit.service.executor.CANCEL_GRACE_S", 1.0)
    job_id, run_tag = f"refused-{uuid.uuid4().hex[:8]}", f"runset-{uuid.uuid4().hex[:8]}"
    job = parse_job(json.dumps({"deployment": DRIVEN, "matrix": {"table": [0, 1, 2]}}).encode())
    journal, state = Journal.open(tmp_path / f"{job_id}.journal")
    with capture_logs() as logs:
        async with (
            Gateway() as gateway,
            Tracker(gateway, tag=run_tag, poll_interval_s=1) as tracker,
        ):
            executor = Executor(
                job,
                job_id,
                gateway=gateway,
                tracker=tracker,
                journal=journal,
                state=state,
                run_tag=run_tag,
            )
            running = asyncio.ensure_future(executor.run(await executor.prepare()))
            created = await wait_for_runs(job_tag(job_id), 3)
            await _delete_run(created[0])
            executor.cancel()
            outcome = await running
    journal.close()
    assert outcome.status is JobStatus.CANCELLED
    states = {run.flow_run_id: run.state_name for run in outcome.result.runs}
    assert states == {r: None if r == created[0] else "Cancelled" for r in created}
    failed = [e for e in logs if e["event"] == "run.cancel_failed"]
    assert [(e["log_level"], e["flow_run_id"]) for e in failed] == [("warning", created[0])]


async def test_library_lines_are_the_seed_sentences(caplog: pytest.LogCaptureFixture) -> None:
    """With stdlib logging at INFO, wait() logs exactly the ✅/❌ lines and the summary sentence."""
    caplog.set_level(logging.INFO, logger="flowsubmit")
    runs = flow_submitter(DRIVEN)
    ok, bad = await asyncio.gather(runs.submit(table=1), runs.submit(table=2))
    await drive([ok], final="Completed")
    await drive([bad], final="Failed")
    await runs.wait()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("flowsubmit")]
    assert sorted(lines[:2]) == sorted(
        [
            f"✅ [{DRIVEN}] Run {ok[:8]} finished with state: Completed",
            f"❌ [{DRIVEN}] Run {bad[:8]} finished with state: Failed",
        ]
    )
    assert lines[2:] == ["Summary → 1/2 succeeded, 1 failed"]


async def test_inside_a_flow_run_the_lines_reach_prefects_logs() -> None:
    """Called inside a flow run, the library's lines are in that flow run's logs, read back from the API."""

    @flow(name="runset-parent")
    async def parent() -> tuple[str, list[str]]:
        async with flow_submitter(DRIVEN) as child:
            ids = list(await asyncio.gather(child.submit(table=1), child.submit(table=2)))
            await drive(ids, final="Completed")
            await child.wait()
        return str(get_run_context().flow_run.id), ids  # type: ignore[union-attr]

    # The session's environment keeps run logs off the API (PREFECT_LOGGING_TO_API_ENABLED=false).
    with temporary_settings(updates={PREFECT_LOGGING_TO_API_ENABLED: True}):
        parent_id, ids = await parent()
        await APILogHandler.aflush()
    async with get_client() as client:
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[uuid.UUID(parent_id)]))
        )
    messages = {log.message for log in logs}
    assert {
        *(f"✅ [{DRIVEN}] Run {r[:8]} finished with state: Completed" for r in ids),
        "Summary → 2/2 succeeded, 0 failed",
    } <= messages


async def test_unreachable_api_fails_within_the_tolerance_naming_the_url() -> None:
    """With nothing listening, submit() raises one error naming the API URL once outage_tolerance_s is spent."""
    url = f"http://127.0.0.1:{free_port()}/api"
    started = time.monotonic()
    with temporary_settings(updates={PREFECT_API_URL: url}):
        nowhere = flow_submitter(DRIVEN, outage_tolerance_s=2.0)
        with pytest.raises(TransientGatewayError) as info:
            async with asyncio.timeout(120):  # a bound on a hang, not a speed claim
                await nowhere.submit(table=1)
    print(f"raised after {time.monotonic() - started:.1f} s (outage_tolerance_s=2)")
    assert str(info.value).startswith(f"Prefect API at {url} unreachable for 2 s")


def test_a_malformed_deployment_name_gets_the_daemons_message() -> None:
    """flow_submitter("no-slash") raises ValueError with the message a job file's `deployment` gets."""
    with pytest.raises(JobRejected) as daemon:
        parse_job(json.dumps({"deployment": "no-slash", "runs": [{}]}).encode())
    with pytest.raises(ValueError) as library:
        flow_submitter("no-slash")
    assert str(library.value) == daemon.value.message


def test_run_batch_submits_waits_and_returns_the_results(served: LocalServer) -> None:
    """run_batch() is synchronous: it submits every parameter set, waits, and returns the results in order."""
    results = flowsubmit.run_batch(
        "process-table-etl/process-table-etl-deployment",
        [{"table": 1, "seconds": 0}, {"table": 2, "fail": True, "seconds": 0}],
        show_summary=False,
    )
    assert list(results.values()) == ["Completed", "Failed"]
