"""Pure parts of what operators see in Prefect and Prometheus: the event's shape, the artifact's
key and Markdown, and the backlog's age (no server)."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

from prefect.settings import PREFECT_EVENTS_MAXIMUM_RELATED_RESOURCES

from flowsubmit._types import JobStatus, RunSnapshot
from flowsubmit.engine.report import job_markdown
from flowsubmit.engine.results import JobResult, RunRecord
from flowsubmit.gateway.job_artifact import artifact_key
from flowsubmit.gateway.job_events import job_event
from flowsubmit.ops.backlog import oldest_age_s


def test_a_job_event_relates_no_more_deployments_than_prefect_accepts() -> None:
    """Distinct deployments in order, cut at PREFECT_EVENTS_MAXIMUM_RELATED_RESOURCES."""
    limit = int(PREFECT_EVENTS_MAXIMUM_RELATED_RESOURCES.value())
    deployments = [(f"id-{i}", f"flow/d{i}") for i in range(limit + 5)]
    event = job_event(
        "completed", "j", labels={"flowsubmit.priority": "0"}, deployments=deployments, payload={}
    )
    assert [r.id for r in event.related] == [f"prefect.deployment.id-{i}" for i in range(limit)]
    assert event.resource.id == "flowsubmit.job.j"
    assert event.resource["flowsubmit.priority"] == "0"


def test_artifact_keys_hold_only_what_prefect_allows() -> None:
    assert artifact_key("Nightly_Tables@etl.v2") == "flowsubmit-nightly-tables-etl-v2"


def test_the_report_lists_the_failing_runs_with_message_and_link_never_parameters() -> None:
    now = datetime.now(UTC)
    ok = RunRecord(stage=0, index=0, deployment="etl/etl", parameters={"table": 777001})
    bad = RunRecord(stage=0, index=1, deployment="etl/etl", parameters={"table": 777002})
    for record, state in ((ok, "COMPLETED"), (bad, "FAILED")):
        record.add_run(f"run-{record.index}")
        record.record(
            RunSnapshot(
                flow_run_id=f"run-{record.index}",
                state_type=state,
                state_name=state.title(),
                flow_run_name=f"name-{record.index}",
                state_message="boom | twice\nover lines" if state == "FAILED" else None,
                end_time=now,
            )
        )
    result = JobResult.of(
        job_id="n", status=JobStatus.FAILED, started_at=now, ended_at=now, records=[ok, bad]
    )
    text = job_markdown(result, lambda run_id: f"https://ui/runs/flow-run/{run_id}")
    assert "Summary → 1/2 succeeded, 1 failed" in text
    assert (
        "| 0 | 1 | etl/etl | [name-1](https://ui/runs/flow-run/run-1) | Failed | boom \\| twice over lines |"
        in text
    )
    assert "name-0" not in text and "77700" not in text


def test_the_backlog_age_is_the_oldest_job_files_and_0_when_empty(tmp_path: Path) -> None:
    assert oldest_age_s(tmp_path) == 0.0
    (tmp_path / "a.json").write_text("{}")
    (tmp_path / "b.json").write_text("{}")
    (tmp_path / "b.result.json").write_text("{}")  # not a job file
    old = time.time() - 600
    os.utime(tmp_path / "a.json", (old, old))
    os.utime(tmp_path / "b.result.json", (old - 600, old - 600))
    assert 600 <= oldest_age_s(tmp_path) < 700
