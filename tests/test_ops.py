"""What operators see: refusal without a Prefect API, /metrics, /healthz, `health`, `status`, `prune`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog
from prometheus_client.parser import text_string_to_metric_families

from flowsubmit.cli import main
from flowsubmit.local.localserver import free_port, prefect_env
from flowsubmit.logs import render_console, resolve_format
from flowsubmit.ops.retention import prune_periodically
from tests.support import ROOT
from tests.support.daemons import Daemon, enqueue, result_of
from tests.support.flows import ETL


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """`main()` in-process (prune) configures structlog onto this test's captured stdout: undo it."""
    yield
    structlog.reset_defaults()


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _scrape(port: int) -> Samples:
    """Every sample of ``/metrics``, keyed by (name, labels)."""
    status, text = _get(port, "/metrics")
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


@dataclass
class _Cli:
    """``flowsubmit`` run in this process (a subprocess would start slower than a run ends)."""

    capsys: pytest.CaptureFixture[str]

    def __call__(self, *args: str) -> tuple[int, str, str]:
        """(exit code, stdout, stderr)."""
        self.capsys.readouterr()
        code = main(list(args))
        out, err = self.capsys.readouterr()
        return code, out, err

    def status(self, queue: Path) -> dict[str, Any]:
        code, out, err = self("status", "--queue", str(queue), "--json")
        assert code == 0, err
        return json.loads(out)  # type: ignore[no-any-return]


def test_run_and_library_refuse_without_prefect_api_url(tmp_path: Path) -> None:
    """Without PREFECT_API_URL, `run` exits 2 with one line and the library raises the same; no server starts."""
    home = tmp_path / "home"  # Prefect's default profile here allows its temporary server
    env = prefect_env(home)
    assert "PREFECT_API_URL" not in env
    run = subprocess.run(
        [sys.executable, "-m", "flowsubmit.cli", "run", "--queue", str(tmp_path / "q")],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    script = (
        "import asyncio\n"
        "from flowsubmit import SettingsError, flow_submitter\n"
        "try:\n"
        "    asyncio.run(flow_submitter('etl/etl').submit(table=1))\n"
        "except SettingsError as exc:\n"
        "    print(f'refused: {exc}')\n"
    )
    library = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=ROOT
    )
    (line,) = run.stderr.splitlines()
    assert (run.returncode, run.stdout) == (2, "")
    assert line.startswith("flowsubmit: PREFECT_API_URL: not set: set it in the environment")
    assert library.stdout == f"refused: {line.removeprefix('flowsubmit: ')}\n"
    # Prefect's temporary server would have created its database in PREFECT_HOME.
    assert not (home / "prefect.db").exists()


def test_version_names_flowsubmit_and_prefect(capsys: pytest.CaptureFixture[str]) -> None:
    """`flowsubmit --version` prints both versions on one line."""
    from importlib.metadata import version

    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0
    assert (
        capsys.readouterr().out
        == f"flowsubmit {version('flowsubmit')} (prefect {version('prefect')})\n"
    )


def _not_final_merged(runs: dict[str, int]) -> dict[str, int]:
    """A job's run counts with scheduled, late and running as one ``not_final``: which of
    them a run is counted as depends on when its last state reached the journal."""
    merged = {k: v for k, v in runs.items() if k not in ("scheduled", "late", "running")}
    return {**merged, "not_final": runs["scheduled"] + runs["late"] + runs["running"]}


@pytest.mark.server
@pytest.mark.timeout(600)  # run alone on a loaded machine, the session server's start counts here
def test_metrics_health_and_recovery_seen_by_an_operator(
    start_daemon: Callable[..., Daemon], capsys: pytest.CaptureFixture[str]
) -> None:
    """/metrics matches the result file during and after a job; health and /healthz follow a kill -9 and a restart."""
    cli = _Cli(capsys)
    port = free_port()
    daemon = start_daemon(metrics_port=port)
    queue = daemon.queue
    ready = daemon.events("service.ready")[0]
    assert ready["prefect_api_url"] == os.environ["PREFECT_API_URL"]
    assert ready["prefect_server_version"] and ready["version"] and ready["tracker"] == "streaming"
    assert _get(port, "/healthz") == (200, '{"status": "ok"}\n')
    code, out, _ = cli("health", "--queue", str(queue))
    assert code == 0 and out.startswith(f"ok: pid {daemon.process.pid} passed its loop")

    # A job of three runs: one completes, one fails, one takes a few seconds.
    runs = [{"table": 1}, {"table": 2, "fail": True}, {"table": 3, "seconds": 10}]
    job_id = enqueue(queue, {"deployment": ETL, "runs": [{"parameters": p} for p in runs]})
    daemon.wait_for_event("run.finished", count=2)
    during = _scrape(port)
    assert _value(during, "flowsubmit_runs_in_flight") == 1
    assert _value(during, "flowsubmit_runs_total", state_type="COMPLETED") == 1
    assert _value(during, "flowsubmit_runs_total", state_type="FAILED") == 1
    assert _value(during, "flowsubmit_queue_files", folder="processing") == 1
    assert _value(during, "flowsubmit_jobs_total", status="failed") == 0
    (job,) = cli.status(queue)["jobs"]
    assert (job["job_id"], job["owner"], job["cancel_requested"]) == (job_id, "alive", False)
    assert _not_final_merged(job["runs"]) == {
        "total": 3,
        "created": 3,
        "not_final": 1,
        "succeeded": 1,
        "failed": 1,
        "cancelled": 0,
    }

    folder, result = daemon.wait_for(lambda: result_of(queue, job_id), what="result")
    after = _scrape(port)
    by_state = result["summary"]["by_state"]
    assert (folder, by_state) == ("failed", {"Completed": 2, "Failed": 1})
    assert _value(after, "flowsubmit_runs_total", state_type="COMPLETED") == by_state["Completed"]
    assert _value(after, "flowsubmit_runs_total", state_type="FAILED") == by_state["Failed"]
    assert _value(after, "flowsubmit_jobs_total", status="failed") == 1
    assert _value(after, "flowsubmit_queue_files", folder="failed") == 1
    assert _value(after, "flowsubmit_queue_files", folder="processing") == 0
    assert _value(after, "flowsubmit_runs_in_flight") == 0
    assert _value(after, "flowsubmit_detection_latency_seconds_count") == 3
    assert _value(after, "flowsubmit_submit_seconds_count") >= 1
    assert _value(after, "flowsubmit_tracker_streaming") == 1
    assert _value(after, "flowsubmit_tracker_fallbacks_total") == 0
    assert _value(after, "flowsubmit_prefect_errors_total", kind="transient") == 0
    assert time.time() - _value(after, "flowsubmit_last_tick_timestamp_seconds") < 60
    (info,) = [k for k in after if k[0] == "flowsubmit_build_info"]
    assert dict(info[1]).keys() == {"version", "prefect_version"}

    # kill -9 during a long run: health says so at once (the pid is gone), status shows the job
    # waiting for recovery; a restarted daemon adopts it and is healthy again.
    long_id = enqueue(
        queue, {"deployment": ETL, "runs": [{"parameters": {"table": 4, "seconds": 120}}]}
    )
    daemon.wait_for_event("run.submitted", count=4)
    daemon.process.kill()
    daemon.process.wait()
    code, _, err = cli("health", "--queue", str(queue))
    assert code == 1
    assert err.startswith(
        f"flowsubmit: health: no daemon serves {queue}: pid {daemon.process.pid} is gone"
    )
    (orphan,) = cli.status(queue)["jobs"]
    assert (orphan["job_id"], orphan["owner"], _not_final_merged(orphan["runs"])["not_final"]) == (
        long_id,
        "waiting_for_recovery",
        1,
    )
    port = free_port()
    again = start_daemon(queue, metrics_port=port)
    assert cli("health", "--queue", str(queue))[0] == 0
    view = cli.status(queue)
    assert view["counts"] == {"incoming": 0, "processing": 1, "done": 0, "failed": 1, "rejected": 0}
    assert [(d["pid"], d["healthy"]) for d in view["daemons"]] == [(again.process.pid, True)]
    (adopted,) = view["jobs"]
    assert (adopted["job_id"], adopted["owner"]) == (long_id, "alive")
    assert _not_final_merged(adopted["runs"]) == {
        "total": 1,
        "created": 1,
        "not_final": 1,
        "succeeded": 0,
        "failed": 0,
        "cancelled": 0,
    }

    # Cancelled: the restarted daemon's counters match the second result file.
    assert cli("cancel", "--queue", str(queue), long_id)[0] == 0
    _, cancelled = again.wait_for(lambda: result_of(queue, long_id), what="cancelled result")
    assert (cancelled["status"], cancelled["summary"]["by_state"]) == (
        "cancelled",
        {"Cancelled": 1},
    )
    metrics = _scrape(port)
    assert _value(metrics, "flowsubmit_jobs_total", status="cancelled") == 1
    assert _value(metrics, "flowsubmit_runs_total", state_type="CANCELLED") == 1
    assert cli.status(queue)["jobs"] == []
    assert again.stop() == 0
    code, _, err = cli("health", "--queue", str(queue))
    assert code == 1 and "no heartbeat file from this host" in err


def _age(paths: list[Path], days: float) -> None:
    then = time.time() - days * 86400
    for path in paths:
        os.utime(path, (then, then))


def test_prune_removes_only_old_finished_and_rejected_jobs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """prune --dry-run lists and keeps; prune removes old done/failed/rejected files only, never incoming/ or processing/."""
    q = tmp_path / "q"
    for folder in ("tmp", "incoming", "processing", "done", "failed", "rejected"):
        (q / folder).mkdir(parents=True)
    old = [
        q / "done" / "old.json",
        q / "done" / "old.result.json",
        q / "done" / "old.journal",
        q / "failed" / "bad.json",
        q / "failed" / "bad.result.json",
        q / "rejected" / "x.json",
        q / "rejected" / "x.json.error.json",
        q / "incoming" / "waiting.json",
        q / "processing" / "running.json",
        q / "processing" / "running.journal",
    ]
    young = [q / "done" / "new.json", q / "done" / "new.result.json"]
    for path in old + young:
        path.write_text("{}")
    _age(old, days=8)

    assert main(["prune", "--queue", str(q), "--older-than", "7d", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "would remove 3 job(s), 7 file(s)"
    assert all(p.exists() for p in old + young)

    assert main(["prune", "--queue", str(q), "--older-than", "7d"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "removed 3 job(s), 7 file(s)"
    assert "retention.removed" in out and "name=old" in out
    assert sorted(str(p.relative_to(q)) for p in q.rglob("*") if p.is_file()) == [
        "done/new.json",
        "done/new.result.json",
        "incoming/waiting.json",
        "processing/running.journal",
        "processing/running.json",
    ]
    assert main(["prune", "--queue", str(q), "--older-than", "7 days"]) == 2
    assert capsys.readouterr().err == (
        "flowsubmit: prune --older-than: '7 days' is not a duration (use e.g. 7d, 12h, 30m, 90s, 2w)\n"
    )


class _Stream:
    def __init__(self, tty: bool) -> None:
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_auto_log_format_is_console_on_a_terminal_and_json_elsewhere() -> None:
    """`auto` picks console for a terminal and json for systemd, containers and pipes."""
    assert resolve_format("auto", _Stream(tty=True)) == "console"
    assert resolve_format("auto", _Stream(tty=False)) == "json"
    assert resolve_format("json", _Stream(tty=True)) == "json"


def test_console_line_is_the_message_then_only_keys_that_add_something() -> None:
    """A console line drops null keys and values already in the message (no hint=None, no repeated deployment)."""
    line = render_console(
        None,
        "info",
        {
            "timestamp": "2026-11-30T04:05:06.789Z",
            "level": "warning",
            "event": "run.finished",
            "logger": "flowsubmit.executor",
            "job_id": "nightly-1",
            "deployment": "etl/etl-deployment",
            "index": 3,
            "state": "Failed",
            "hint": None,
            "message": "❌ [etl/etl-deployment] Run abc12345 finished with state: Failed",
        },
    )
    assert line == (
        "04:05:06 warning ❌ [etl/etl-deployment] Run abc12345 finished with state: Failed"
        "  job_id=nightly-1 index=3"
    )


def test_health_without_a_queue_exits_1_and_retention_days_prunes_at_start(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """health on a missing queue exits 1 (Docker reserves 2); the daemon's retention task prunes at once."""
    assert main(["health", "--queue", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err.startswith(
        f"flowsubmit: queue {tmp_path / 'nope'}: does not exist"
    )

    done = tmp_path / "q" / "done"
    done.mkdir(parents=True)
    old = [done / "old.json", done / "old.result.json"]
    for path in old:
        path.write_text("{}")
    _age(old, days=31)

    async def keep_for_a_moment() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(prune_periodically(tmp_path / "q", 30, stop))
        await asyncio.sleep(0)  # the first prune runs before the task's first wait
        assert not any(p.exists() for p in old)
        stop.set()
        await task

    asyncio.run(keep_for_a_moment())
