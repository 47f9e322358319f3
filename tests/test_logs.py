"""Log rendering: JSON lines for machines, the console sentence for people, secrets masked (no server)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import structlog

from flowsubmit import logs
from flowsubmit._types import RunSnapshot
from flowsubmit.engine.results import finished_message


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Each test configures structlog itself; leave the defaults behind."""
    yield
    structlog.reset_defaults()


def _log_run_finished() -> None:
    snap = RunSnapshot(
        "abc12345-0000-4000-8000-000000000000", "COMPLETED", "Completed", flow_run_name="brave-fox"
    )
    log = structlog.get_logger("flowsubmit.executor")
    with structlog.contextvars.bound_contextvars(job_id="j1", deployment="etl/etl-deployment"):
        log.info(
            "run.finished",
            flow_run_id=snap.flow_run_id,
            state="Completed",
            message=finished_message("etl/etl-deployment", snap),
        )


def test_json_lines_carry_timestamp_level_event_and_context(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In JSON mode every line is one object with UTC timestamp, level, dotted event and bound context."""
    logs.configure("json", "info", cache=False)
    _log_run_finished()
    (line,) = capsys.readouterr().out.splitlines()
    record = json.loads(line)
    assert record["timestamp"].endswith("Z")
    assert {k: record[k] for k in ("level", "event", "job_id", "deployment", "state")} == {
        "level": "info",
        "event": "run.finished",
        "job_id": "j1",
        "deployment": "etl/etl-deployment",
        "state": "Completed",
    }
    assert (
        record["message"] == "✅ [etl/etl-deployment] Run abc12345 finished with state: Completed"
    )


def test_console_shows_the_sentence_in_place_of_the_event_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """In console mode the run line reads `✅ [deployment] Run abc12345 finished with state: Completed`."""
    logs.configure("console", "info", cache=False)
    _log_run_finished()
    out = capsys.readouterr().out
    assert "✅ [etl/etl-deployment] Run abc12345 finished with state: Completed" in out
    assert "run.finished" not in out


def test_secret_like_keys_are_masked_at_any_depth(capsys: pytest.CaptureFixture[str]) -> None:
    """Values under password/token/secret/key-like names never reach a line."""
    logs.configure("json", "info", cache=False)
    structlog.get_logger().info(
        "job.claimed",
        parameters={"table": 1, "db_password": "hunter2", "nested": {"apiKey": "k-1"}},
        token="t-9",
    )
    record = json.loads(capsys.readouterr().out)
    assert record["parameters"] == {"table": 1, "db_password": "***", "nested": {"apiKey": "***"}}
    assert record["token"] == "***"


def test_level_filter_drops_lower_levels(capsys: pytest.CaptureFixture[str]) -> None:
    """With level `warning`, info lines are not written."""
    logs.configure("json", "warning", cache=False)
    log = structlog.get_logger()
    log.info("service.ready")
    log.warning("tracker.fallback")
    assert [json.loads(line)["event"] for line in capsys.readouterr().out.splitlines()] == [
        "tracker.fallback"
    ]


def test_console_writes_structures_as_json_not_python_reprs(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A dict, list or boolean value reads as JSON on the console: no ``{'uid': 0}``, no ``True``."""
    logs.configure("console", "info", cache=False)
    structlog.get_logger().info(
        "job.claimed", producer={"uid": 0, "user": "root"}, tags=["a", "b"], recovered=True
    )
    out = capsys.readouterr().out
    assert 'producer={"uid":0,"user":"root"} tags=["a","b"] recovered=true' in out
    assert "'" not in out


def test_a_value_orjson_refuses_is_written_all_the_same(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A lone surrogate (a file name's undecodable byte), an int beyond 64 bits or a key that is
    not a str: the line is still one JSON object, never dropped nor a traceback."""
    logs.configure("json", "info", cache=False)
    structlog.get_logger().warning(
        "job.rejected", file="bad-\udcff.json", field={"n": 2**70, 1: "one"}
    )
    record = json.loads(capsys.readouterr().out)
    assert record["event"] == "job.rejected"
    assert record["field"] == {"n": 2**70, "1": "one"}
    assert record["file"] == "bad-\udcff.json"
