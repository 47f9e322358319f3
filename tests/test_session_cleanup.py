"""A test session removes what it created in the temporary directory."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support import ROOT


def test_a_passing_session_leaves_nothing_in_the_temporary_directory(tmp_path: Path) -> None:
    """A session (without the server: one test of pure checks) run with TMPDIR here leaves it empty."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"),
            "tests/test_docs.py::test_the_license_file_is_the_apache_2_text_pyproject_names",
        ],
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(temp)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-2000:]
    assert [p.name for p in temp.iterdir() if p.name.startswith("flowsubmit-")] == []
