"""``flowsubmit validate`` (check job files, every problem listed) and ``flowsubmit schema`` (the job JSON Schema)."""

from __future__ import annotations

import argparse
import json
from functools import partial

from flowsubmit.cli.command import Command
from flowsubmit.cli.errors import EXIT_OK, EXIT_USAGE
from flowsubmit.cli.files import check_patterns, policy_problems, print_problems
from flowsubmit.cli.options import add_config, load_settings
from flowsubmit.jobs.model import job_schema

__all__ = ["SCHEMA", "VALIDATE"]


def _validate_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files", nargs="+", metavar="FILE", help="job files or glob patterns; - for standard input"
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON document (for editors and CI)"
    )
    parser.add_argument(
        "--policy",
        action="store_true",
        help="also check the daemon's policy (allowed_deployments, allowed_job_variables, "
        "[[producers]]; from --config and FLOWSUBMIT_*) for the user running this",
    )
    add_config(parser)  # no --queue: validate judges files, not a queue


def _cmd_validate(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    policy = partial(policy_problems, settings=settings, full=args.policy)
    checked = check_patterns(args.files, settings, policy)
    ok = all(not c.problems for c in checked)
    if args.json:
        print(json.dumps({"ok": ok, "files": [c.as_dict() for c in checked]}, indent=2))
        return EXIT_OK if ok else EXIT_USAGE
    for c in checked:
        if c.job is not None:
            runs = c.job.total_runs
            print(f"ok: {c.file}: {runs} run{'s' if runs != 1 else ''}")
        print_problems(c.problems)
    return EXIT_OK if ok else EXIT_USAGE


VALIDATE = Command(
    "validate",
    "check job files; every problem is listed (exit 0, or 2 if any file is bad)",
    "flowsubmit validate jobs/*.json",
    _cmd_validate,
    _validate_arguments,
)


def _cmd_schema(_: argparse.Namespace) -> int:
    print(json.dumps(job_schema(), indent=2))
    return EXIT_OK


SCHEMA = Command(
    "schema", "print the job JSON Schema", "flowsubmit schema > job.schema.json", _cmd_schema
)
