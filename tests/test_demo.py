"""`flowsubmit demo` itself, as a new user runs it: its own server, served flow, daemon and 20-run job."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from flowsubmit.localserver import prefect_env

ROOT = Path(__file__).resolve().parent.parent


def test_demo_prints_the_runs_and_the_summary(tmp_path: Path) -> None:
    """The demo ends with 20 run lines (two failed on purpose), the summary, and a result file; exit 0."""
    env = prefect_env(tmp_path)  # no PREFECT_API_URL: the demo starts its own server
    done = subprocess.run(
        [sys.executable, "-m", "flowsubmit.cli", "demo"],
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
    result_path = Path(lines[-1].removeprefix("result file: "))
    result = json.loads(result_path.read_text())
    assert (result["status"], result["summary"]["succeeded"], result["summary"]["failed"]) == (
        "failed",
        18,
        2,
    )
