"""Runs many ``flowsubmit`` command lines quickly: each in a fork of one process that imported flowsubmit once.

A forked child is a real process with its own file descriptors, environment, working
directory and exit status, so a case sees what a shell would: a closed pipe, a closed
standard input, the interpreter's last flush. Only the import (about a second of CPU
per ``flowsubmit`` start) is shared. A case with ``exec`` runs a real ``flowsubmit``
process instead (for ``setpriv``), from the same child.

Used by ``tests/test_cli_misuse.py``: ``python -m tests.support.clirunner CASES.json OUT.json``.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import flowsubmit.cli
import flowsubmit.gateway.client
import flowsubmit.service.daemon
import flowsubmit.service.executor


def run(case: dict[str, Any], workdir: Path) -> dict[str, Any]:
    """Run one case in a forked child; its exit code, stdout and stderr."""
    out, err = workdir / "out", workdir / "err"
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(case, out, err)  # never returns
    _, status = os.waitpid(pid, 0)
    return {
        "code": os.waitstatus_to_exitcode(status),
        "stdout": out.read_text(errors="replace"),
        "stderr": err.read_text(errors="replace"),
    }


def _child(case: dict[str, Any], out: Path, err: Path) -> None:
    code = 99
    try:
        os.chdir(case["cwd"])
        os.environ.clear()
        os.environ.update(case["env"])
        _redirect(case, out, err)
        if case.get("exec"):
            os.execvp(case["exec"][0], [*case["exec"], *case["argv"]])
        code = flowsubmit.cli.main(case["argv"])
        code = _exit_flush(code)
    except BaseException:  # what the interpreter would print for an uncaught exception
        traceback.print_exc()
        sys.stderr.flush()
        code = 1
    finally:
        os._exit(code)


def _redirect(case: dict[str, Any], out: Path, err: Path) -> None:
    stdin = case.get("stdin")
    if stdin == "closed":
        os.close(0)
        sys.stdin = None  # type: ignore[assignment]  # what Python sets when started without fd 0
    else:
        source = tempfile.TemporaryFile()  # noqa: SIM115  (its descriptor becomes fd 0)
        source.write((stdin or "").encode())
        source.seek(0)
        os.dup2(source.fileno(), 0)
    if case.get("stdout") == "closed-pipe":
        reader, writer = os.pipe()
        os.close(reader)  # the reader went away, as `| head` does once it has its lines
        os.dup2(writer, 1)
    else:
        os.dup2(os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
    os.dup2(os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)


def _exit_flush(code: int) -> int:
    """The interpreter's final flush of stdout, and what it does when that fails (exit 120)."""
    try:
        sys.stdout.flush()
    except Exception as exc:
        print(f"Exception ignored on flushing sys.stdout:\n{exc!r}", file=sys.stderr)
        sys.stderr.flush()
        return 120
    return code


def main() -> None:
    """Read the cases, run each, write the outcomes."""
    cases = json.loads(Path(sys.argv[1]).read_text())
    with tempfile.TemporaryDirectory(prefix="flowsubmit-clirunner-") as workdir:
        outcomes = [run(case, Path(workdir)) for case in cases]
    Path(sys.argv[2]).write_text(json.dumps(outcomes))


if __name__ == "__main__":
    main()
