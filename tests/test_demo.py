"""`flowsubmit demo` itself, as a new user runs it: its own server, served flow, daemon and 20-run job."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from flowsubmit.local.localserver import prefect_env

ROOT = Path(__file__).resolve().parent.parent


def test_demo_prints_the_runs_and_the_summary(tmp_path: Path) -> None:
    """The demo ends with 20 run lines (two failed on purpose), the summary, and a result file
    (kept, with ``--keep``); exit 0. Its only warnings are the failing runs' (and their job's)."""
    # No PREFECT_API_URL: the demo starts its own server; its temporary folders go in tmp_path.
    env = {**prefect_env(tmp_path), "TMPDIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "flowsubmit.cli", "demo", "--keep"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = done.stdout.splitlines()
    json_lines = [json.loads(line) for line in lines if line.startswith("{")]
    finished = [line for line in json_lines if line["event"] == "run.finished"]
    assert len(finished) == 20
    assert sorted(line["state"] for line in finished) == ["Completed"] * 18 + ["Failed"] * 2
    recap = [line for line in lines if line.startswith(("✅", "❌"))]
    assert len(recap) == 20
    assert [line.split("(table ")[1].rstrip(")") for line in recap if line.startswith("❌")] == [
        "7",
        "17",
    ]
    assert "Summary → 18/20 succeeded, 2 failed" in lines
    warnings = [line for line in json_lines if line["level"] in ("warning", "error")]
    # The two failing runs, and the job they failed; nothing else asks anyone to act.
    assert sorted((line["event"], line.get("state"), line.get("status")) for line in warnings) == [
        ("job.finished", None, "failed"),
        ("run.finished", "Failed", None),
        ("run.finished", "Failed", None),
    ], warnings
    assert lines[-1].startswith(f"queue kept in {tmp_path}/flowsubmit-demo-"), lines[-1]
    (result_line,) = [line for line in lines if line.startswith("result file: ")]
    result_path = Path(result_line.removeprefix("result file: "))
    result = json.loads(result_path.read_text())
    assert (result["status"], result["summary"]["succeeded"], result["summary"]["failed"]) == (
        "failed",
        18,
        2,
    )


def _processes_with(marker: str) -> list[int]:
    """PIDs whose environment contains ``marker`` (the demo's Prefect home)."""
    found = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes():
                found.append(int(environ.parent.name))
        except OSError:
            continue
    return found


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_stops_everything_the_demo_started(tmp_path: Path) -> None:
    """SIGINT mid-demo exits 130 and leaves no server, served flow or daemon behind."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    process = subprocess.Popen(
        [sys.executable, "-m", "flowsubmit.cli", "demo"],
        env={**prefect_env(tmp_path), "TMPDIR": str(temp)},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
        # As in a terminal: Python turns SIGINT into KeyboardInterrupt only if the signal
        # is not ignored when it starts, and a test worker may have left it ignored.
        preexec_fn=_default_sigint,
    )
    assert process.stdout is not None
    home = None
    for line in process.stdout:
        if line.startswith("starting a local Prefect server (SQLite in "):
            home = "PREFECT_HOME=" + line.split("SQLite in ")[1].split(")")[0]
        if line.startswith("enqueued job"):
            break
    assert home is not None
    assert len(_processes_with(home)) >= 3  # server, served flow, daemon (and their children)

    process.send_signal(signal.SIGINT)
    code = process.wait(60)
    assert code == 130, (process.stdout.read(), process.stderr.read())  # type: ignore[union-attr]
    assert "interrupted: everything the demo started has been stopped" in process.stderr.read()  # type: ignore[union-attr]
    assert _processes_with(home) == []
    # The queue (with its job) and Prefect's home removed (Prefect's runner_storage is Prefect's).
    assert [p.name for p in temp.iterdir() if p.name.startswith("flowsubmit-")] == []
