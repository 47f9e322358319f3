"""Every Python snippet of README.md and docs/library.md runs as written against the real server."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flowsubmit.local.localserver import LocalServer
from tests.support import ROOT

DOCS = ("README.md", "docs/library.md")
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
#: Runs each snippet as ``__main__`` in a fresh namespace, one after another, in one process.
_RUNNER = """
import json, sys, time
for name, code in json.load(open(sys.argv[1])):
    print("running", name, flush=True)
    started = time.monotonic()
    exec(compile(code, name, "exec"), {"__name__": "__main__"})
    print("ran", name, round(time.monotonic() - started, 1), "s", flush=True)
"""


def _snippets() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        for i, match in enumerate(_BLOCK.finditer((ROOT / doc).read_text())):
            found.append((f"{doc}#{i}", match.group(1)))
    return found


def _run(served: LocalServer, tmp_path: Path, snippets: list[tuple[str, str]]) -> str:
    listing = tmp_path / f"snippets-{len(snippets)}.json"
    listing.write_text(json.dumps(snippets))
    done = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(listing)],
        env=served.env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=840,
    )
    print(done.stdout)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert done.stdout.count("ran ") == len(snippets), done.stdout
    return done.stderr


@pytest.mark.timeout(900)  # about 25 real runs of the served flow, one snippet after another
def test_every_python_snippet_runs_as_written(served: LocalServer, tmp_path: Path) -> None:
    """Each ```python block of README.md and docs/library.md runs as a script against the real server."""
    snippets = [s for s in _snippets() if "run_batch(" not in s[1] or "import asyncio" in s[1]]
    assert len(snippets) >= 6
    _run(served, tmp_path, snippets)


def test_a_plain_script_shows_exactly_the_seed_lines(served: LocalServer, tmp_path: Path) -> None:
    """The run_batch snippet, alone in a process with basicConfig(INFO), prints the ✅ lines and the summary, nothing else."""
    (snippet,) = [s for s in _snippets() if "run_batch(" in s[1] and "import asyncio" not in s[1]]
    lines = _run(served, tmp_path, [snippet]).splitlines()
    deployment = "process-table-etl/process-table-etl-deployment"
    finished = re.compile(
        rf"✅ \[{re.escape(deployment)}\] Run [0-9a-f]{{8}} finished with state: Completed"
    )
    assert len(lines) == 4, lines
    assert all(finished.fullmatch(line) for line in lines[:3]), lines
    assert lines[3] == "Summary → 3/3 succeeded, 0 failed"


_HEREDOC = re.compile(r"^python - <<'EOF'\n(.*?)^EOF\n", re.S | re.M)


def test_readme_heredoc_shows_the_seed_lines_on_stderr_and_nothing_on_stdout(
    served: LocalServer, tmp_path: Path
) -> None:
    """README's ``python - <<'EOF'`` snippet, in a bare process with no logging configured: lines on stderr only."""
    (code,) = _HEREDOC.findall((ROOT / "README.md").read_text())
    done = subprocess.run(
        [sys.executable, "-"],
        input=code,
        env=served.env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    deployment = "process-table-etl/process-table-etl-deployment"
    finished = re.compile(
        rf"✅ \[{re.escape(deployment)}\] Run [0-9a-f]{{8}} finished with state: Completed"
    )
    assert len(lines) == 4, lines
    assert all(finished.fullmatch(line) for line in lines[:3]), lines
    assert lines[3] == "Summary → 3/3 succeeded, 0 failed"
