"""``flowsubmit demo``: a local Prefect server, the example flow served, the daemon, and a 20-run job."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flowsubmit.engine.results import JobResult
from flowsubmit.local.localserver import LocalServer, served_flows
from flowsubmit.queue.folders import Queue

__all__ = ["demo_job", "plan", "run_demo"]

DEPLOYMENT = "process-table-etl/process-table-etl-deployment"
FAILING_TABLES = (7, 17)


def demo_job(runs: int = 20) -> dict[str, Any]:
    """The example job: tables 1..runs, of which tables 7 and 17 fail on purpose."""
    return {
        "deployment": DEPLOYMENT,
        "parameters": {"mode": "full"},
        "runs": [
            {"parameters": {"table": t, "fail": t in FAILING_TABLES}} for t in range(1, runs + 1)
        ],
        "tags": ["demo"],
    }


def plan(runs: int) -> str:
    """What the example job of ``runs`` runs will do, in words (``--runs`` changes it)."""
    failing = [t for t in FAILING_TABLES if t <= runs]
    fails = (
        f"table{'s' if len(failing) > 1 else ''} {', '.join(map(str, failing))} "
        f"fail{'s' if len(failing) == 1 else ''} on purpose"
        if failing
        else "none fails on purpose"
    )
    tables = "table 1" if runs == 1 else f"tables 1 to {runs}"
    return f"{runs} run{'s' if runs != 1 else ''}: {tables}, {fails}"


def run_demo(
    runs: int = 20, log_format: str = "json", timeout_s: float = 180.0, *, keep: bool = False
) -> int:
    """Run the whole demo; stops everything it started, also on Ctrl-C. Returns an exit code.

    Its temporary folder (the queue, the job file) is removed at the end, also on Ctrl-C,
    unless ``keep``; Prefect's home always is.
    """
    say = _printer()
    folder = Path(tempfile.mkdtemp(prefix="flowsubmit-demo-"))
    try:
        with tempfile.TemporaryDirectory(prefix="flowsubmit-demo-prefect-") as home:
            say(f"starting a local Prefect server (SQLite in {home}) ...")
            with LocalServer(home=Path(home)) as server:
                say(f"Prefect API at {server.api_url}; serving the example flow ...")
                with served_flows(server, "flowsubmit.local.examples"):
                    return _run_daemon_and_job(
                        server, folder / "queue", runs, log_format, timeout_s, say
                    )
    finally:
        if keep:
            say(f"queue kept in {folder / 'queue'}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
            say(f"queue removed ({folder}); flowsubmit demo --keep keeps it")


def _run_daemon_and_job(
    server: LocalServer, queue: Path, runs: int, log_format: str, timeout_s: float, say: Any
) -> int:
    env = server.env(
        FLOWSUBMIT_LOG_FORMAT=log_format,
        FLOWSUBMIT_POLL_INTERVAL_S="2",
        # The demo's queue launches its one deployment: no warning that it could launch any.
        FLOWSUBMIT_ALLOWED_DEPLOYMENTS=json.dumps([DEPLOYMENT]),
    )
    daemon = subprocess.Popen(
        [sys.executable, "-m", "flowsubmit.cli", "run", "--queue", str(queue)],
        env=env,
        stdin=subprocess.DEVNULL,
    )
    try:
        job = queue.parent / "demo-job.json"
        job.write_text(json.dumps(demo_job(runs), indent=2))
        enqueued = subprocess.run(
            [
                *(sys.executable, "-m", "flowsubmit.cli", "enqueue", "--create"),
                *("--queue", str(queue), str(job)),
            ],
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
        job_id = enqueued.stdout.strip()
        say(f"enqueued job {job_id} ({plan(runs)})")
        result, path = _wait_for_result(queue, job_id, daemon, timeout_s)
    finally:
        _terminate(daemon)
    _print_result(result, path, say)
    return 0


def _wait_for_result(
    queue: Path, job_id: str, daemon: subprocess.Popen[bytes], timeout_s: float
) -> tuple[JobResult, Path]:
    """The job's result, and the path of its result file."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ended = Queue(queue).outcome(job_id)
        if ended is not None:
            folder, document = ended
            if folder == "rejected":
                raise RuntimeError(f"the job was rejected: {document}")
            return JobResult.from_dict(document), queue / folder / f"{job_id}.result.json"
        if daemon.poll() is not None:
            raise RuntimeError(f"the daemon exited with {daemon.returncode}")
        time.sleep(0.2)
    raise TimeoutError(f"job {job_id} not finished after {timeout_s}s")


def _print_result(result: JobResult, path: Path, say: Any) -> None:
    say("")
    for run in result.runs:
        mark = "✅" if run.succeeded else "❌"
        short = (run.flow_run_id or "--------")[:8]
        say(
            f"{mark} [{run.deployment}] Run {short} finished with state: {run.state_name}  (table {run.parameters.get('table')})"
        )
    say(result.summary.line)
    say(f"result file: {path}")


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _printer() -> Any:
    def say(line: str) -> None:
        print(line, flush=True)

    return say


if __name__ == "__main__":  # pragma: no cover
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(run_demo())
