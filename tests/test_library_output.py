"""What a script sees of the library: its lines on stderr or through the script's logging, never on stdout.

Each case runs a script in a subprocess of its own (logging's configuration is per
process) that submits 32 runs one after another, so that the create-call limit
changes (``gateway.call_limit``), and drives them to their ends: 30 Completed, 2 Failed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from flowsubmit.local.localserver import LocalServer
from tests.support import ROOT
from tests.support.flows import DRIVEN

_SCRIPT = """
import asyncio, logging, sys
from flowsubmit import flow_submitter
from tests.support.driver import drive

{configure}

async def main() -> None:
    async with flow_submitter({deployment!r}) as runs:
        ids = [await runs.submit(table=i) for i in range(32)]
        await drive(ids[:30])
        await drive(ids[30:], "Failed")
        await runs.wait()

asyncio.run(main())
"""
_RUN = r"Run [0-9a-f]{8} finished with state: "


def _script(
    tmp_path: Path, served: LocalServer, configure: str
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT.format(configure=configure, deployment=DRIVEN)],
        # The script imports the test driver: the repository is on its path, its cwd is not.
        env=_with_root_on_path(served.env()),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _with_root_on_path(env: dict[str, str]) -> dict[str, str]:
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))}


@pytest.mark.timeout(240)
def test_with_no_logging_configured_the_seed_lines_and_summary_go_to_stderr(
    served: LocalServer, tmp_path: Path
) -> None:
    """No handler anywhere: every ✅/❌ line and the summary on stderr, message only; stdout empty."""
    done = _script(tmp_path, served, configure="")
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 33, lines
    assert sum(bool(re.fullmatch(rf"✅ \[{DRIVEN}\] {_RUN}Completed", x)) for x in lines) == 30
    assert sum(bool(re.fullmatch(rf"❌ \[{DRIVEN}\] {_RUN}Failed.*", x)) for x in lines) == 2
    assert lines[-1] == "Summary → 30/32 succeeded, 2 failed"


@pytest.mark.timeout(240)
def test_once_the_script_configures_logging_its_levels_decide(
    served: LocalServer, tmp_path: Path
) -> None:
    """``basicConfig(level=WARNING)``: only the two ❌ lines, through the script's format; nothing else anywhere."""
    configure = (
        'logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")'
    )
    done = _script(tmp_path, served, configure)
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 2, lines
    assert all(
        re.fullmatch(rf"WARNING flowsubmit.submission ❌ \[{DRIVEN}\] {_RUN}Failed.*", x)
        for x in lines
    ), lines
