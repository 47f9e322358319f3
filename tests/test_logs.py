"""Log rendering: JSON lines for machines, the console sentence for people, secrets masked (no server)."""

from __future__ import annotations

import asyncio
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


class _CountingStream:
    """A stdout that keeps what is written and counts flushes (what reaches the real stream)."""

    def __init__(self) -> None:
        self.text, self.flushes = "", 0

    def write(self, text: str) -> int:
        self.text += text
        return len(text)

    def flush(self) -> None:
        self.flushes += 1

    def isatty(self) -> bool:
        return False


async def test_the_lines_of_one_loop_turn_are_flushed_once_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A burst of run lines in one event-loop turn costs one flush, right after the turn;
    outside a loop (a one-shot command) each line is flushed as it is written."""
    stream = _CountingStream()
    monkeypatch.setattr("sys.stdout", stream)
    logs.configure("json", "info", cache=False)
    log = logs.get_logger("flowsubmit.executor")
    for index in range(20):
        log.info("run.finished", index=index)
    assert (stream.text.count("\n"), stream.flushes) == (20, 0)
    await asyncio.sleep(0)
    assert stream.flushes == 1
    log.info("run.finished", index=20)
    await asyncio.sleep(0)
    assert stream.flushes == 2
    assert [json.loads(line)["index"] for line in stream.text.splitlines()] == list(range(21))
    await asyncio.to_thread(log.info, "run.finished", index=21)  # no loop in that thread
    assert stream.flushes == 3


def test_a_line_with_nothing_to_mask_is_written_as_logged(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """No secret-like key: every value as given, lists and nested maps included."""
    logs.configure("json", "info", cache=False)
    structlog.get_logger().info("job.claimed", tags=["a", {"b": 1}], producer={"uid": 0})
    record = json.loads(capsys.readouterr().out)
    assert (record["tags"], record["producer"]) == (["a", {"b": 1}], {"uid": 0})
