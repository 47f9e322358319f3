"""Job files named on the command line: glob patterns, reading them safely, and judging them for ``validate`` and ``enqueue``."""

from __future__ import annotations

import glob
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowsubmit.errors import JobRejected
from flowsubmit.jobs.model import Job, check_job
from flowsubmit.jobs.policy import current_producer, reserved_tag_problems
from flowsubmit.settings import Settings

__all__ = [
    "Checked",
    "check_file",
    "check_patterns",
    "display",
    "policy_problems",
    "print_problems",
    "read_job_file",
]

#: The name ``-`` (standard input) has in messages.
STDIN = "<stdin>"


@dataclass
class Checked:
    """One job file as it was judged: the job, or every problem found in it."""

    file: str
    data: bytes = b""
    job: Job | None = None
    problems: list[JobRejected] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The file's entry of ``validate --json``."""
        return {
            "file": self.file,
            "ok": not self.problems,
            "runs": self.job.total_runs if self.job else None,
            "problems": [{**p.as_dict(), "message": p.message} for p in self.problems],
        }


def display(name: str) -> str:
    """How a file argument is named in messages (``-`` is standard input)."""
    return STDIN if name == "-" else name


def read_job_file(name: str, max_bytes: int) -> bytes:
    """The bytes of a job file (``-``: standard input), at most ``max_bytes``.

    Raises:
        JobRejected: the file cannot be read (missing, a directory, permission) or is too large.
    """
    try:
        if name == "-":
            if sys.stdin is None:  # started with its standard input closed
                raise JobRejected("standard input is closed", file=STDIN)
            data = sys.stdin.buffer.read(max_bytes + 1)
        else:
            with open(name, "rb") as source:
                data = source.read(max_bytes + 1)
    except FileNotFoundError:
        raise JobRejected("no such file", file=name) from None
    except IsADirectoryError:
        raise JobRejected(
            "is a directory", file=name, hint=f"give the files in it: {name.rstrip('/')}/*.json"
        ) from None
    except PermissionError:
        raise JobRejected("permission denied", file=name) from None
    except OSError as exc:
        raise JobRejected(f"cannot be read: {exc.strerror or exc}", file=display(name)) from None
    if len(data) > max_bytes:
        raise JobRejected(
            f"the file is larger than max_job_bytes ({max_bytes})", file=display(name)
        )
    return data


#: More checks of a job that parsed (the daemon's policy): its problems, if any.
Judge = Callable[[Job], list[JobRejected]]


def check_file(name: str, settings: Settings, judge: Judge | None = None) -> Checked:
    """Read and judge one job file, with the daemon's limits and ``judge``; never raises for a bad file."""
    file = display(name)
    try:
        data = read_job_file(name, settings.max_job_bytes)
    except JobRejected as exc:
        return Checked(file, problems=[exc])
    job, problems = check_job(data, file=file, max_runs=settings.max_runs_per_job)
    if job is not None and judge is not None:
        problems = [problem.with_file(file) for problem in judge(job)]
    return Checked(file, data, None if problems else job, problems)


def check_patterns(
    patterns: list[str], settings: Settings, judge: Judge | None = None
) -> list[Checked]:
    """Judge every file the arguments name, globs expanded in order; a pattern matching nothing is a problem."""
    checked: list[Checked] = []
    for pattern in patterns:
        if pattern == "-" or not glob.has_magic(pattern) or Path(pattern).exists():
            checked.append(check_file(pattern, settings, judge))
            continue
        matches = sorted(glob.glob(pattern, recursive=True))
        checked.extend(check_file(name, settings, judge) for name in matches)
        if not matches:
            problem = JobRejected("no file matches this pattern", file=pattern)
            checked.append(Checked(pattern, problems=[problem]))
    return checked


def policy_problems(job: Job, settings: Settings, *, full: bool) -> list[JobRejected]:
    """How ``job`` breaks the policy for the user running this (``enqueue`` writes the file as them).

    Without ``full`` only the reserved tags, which no setting allows, and parameters
    Prefect would fill in (unless ``allow_prefect_kinds``); with it, the whole policy the
    settings describe, as the daemon holding them would judge it.
    """
    if not full:
        return reserved_tag_problems(job, allow_prefect_kinds=settings.allow_prefect_kinds)
    return settings.policy().problems(job, current_producer())


def print_problems(problems: list[JobRejected]) -> None:
    """One ``flowsubmit: FILE: field 'x': why (hint)`` line per problem, on stderr."""
    for problem in problems:
        print(f"flowsubmit: {problem.message}", file=sys.stderr)
