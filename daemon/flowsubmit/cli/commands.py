"""The ``flowsubmit`` command line: run, enqueue, validate, status, cancel, health, prune, schema, demo.

Every command is a ``_cmd_*`` function registered in ``_COMMANDS``; ``main`` runs it
through ``cli_errors.guarded``, the one error path (docs/cli.md lists the exit codes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from flowsubmit import logs
from flowsubmit._types import JobStatus
from flowsubmit.cli.actions import (
    ask_prefect,
    cancel,
    drop,
    open_queue,
    refuse_known_id,
    wait_for_end,
)
from flowsubmit.cli.errors import (
    EXIT_ERROR,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    Parser,
    guarded,
)
from flowsubmit.cli.files import check_file, check_patterns, print_problems
from flowsubmit.engine.results import JobResult
from flowsubmit.errors import JobRejected
from flowsubmit.gateway.connection import configured_api_url, versions
from flowsubmit.jobs.model import PRIORITY_MAX, PRIORITY_MIN, Job, job_schema
from flowsubmit.jobs.policy import current_producer, reserved_tag_problems
from flowsubmit.queue.folders import new_job_id
from flowsubmit.settings import Settings

__all__ = ["EXIT_ERROR", "EXIT_OK", "EXIT_USAGE", "main"]


# -- the parser -------------------------------------------------------------------------


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field, with the field's description as help (one source of truth)."""
    group = parser.add_argument_group(
        "settings (also FLOWSUBMIT_<NAME> and the --config TOML file)"
    )
    for name, setting in Settings.model_fields.items():
        if name in ("queue", "producers"):  # producers: TOML tables (or JSON in the env) only
            continue
        flag = "--" + name.replace("_", "-")
        if setting.annotation == list[str]:  # repeat the flag: --allowed-deployments 'etl/*' ...
            group.add_argument(
                flag, dest=name, action="append", help=f"{setting.description} Repeatable."
            )
        elif setting.annotation is bool:
            group.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=setting.description,
            )
        else:
            group.add_argument(
                flag,
                dest=name,
                default=None,
                metavar=name.upper(),
                help=f"{setting.description} (default: {setting.default})",
            )


def _common() -> argparse.ArgumentParser:
    """Options every subcommand takes."""
    common = Parser(add_help=False)
    common.add_argument(
        "--debug",
        action="store_true",
        default=argparse.SUPPRESS,
        help="on an error, show the Python traceback too",
    )
    return common


def _queue_options(*, config: bool = True) -> argparse.ArgumentParser:
    """``--queue`` (and ``--config``), for every subcommand that works on a queue."""
    options = Parser(add_help=False)
    options.add_argument(
        "--queue",
        type=Path,
        metavar="DIR",
        help="the queue directory (default: $FLOWSUBMIT_QUEUE, or `queue` in the --config file)",
    )
    if config:
        _config_option(options)
    return options


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, metavar="FILE", help="TOML file of settings (docs/cli.md)"
    )


def _command(
    commands: Any,
    name: str,
    help: str,
    example: str,
    *parents: argparse.ArgumentParser,
    description: str | None = None,
) -> argparse.ArgumentParser:
    """Add a subcommand whose ``--help`` ends with an example."""
    return commands.add_parser(  # type: ignore[no-any-return]
        name,
        help=help,
        description=description or help[:1].upper() + help[1:] + ".",
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common(), *parents],
    )


def _parser() -> Parser:
    parser = Parser(
        prog="flowsubmit",
        description="Fan out job files into Prefect deployment runs, and fan their final states back in.",
        epilog=(
            "exit codes: 0 success, 1 runtime failure, 2 bad usage or input (docs/cli.md)\n\n"
            "example:\n  flowsubmit validate jobs/*.json && flowsubmit enqueue --queue /var/spool/flowsubmit jobs/nightly.json"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=[_common()],
    )
    parser.add_argument(
        "--version",
        action="version",
        version="flowsubmit {} (prefect {})".format(*versions()),
        help="print flowsubmit's and Prefect's versions",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = _command(
        commands,
        "run",
        "run the daemon in the foreground",
        "PREFECT_API_URL=http://127.0.0.1:4200/api flowsubmit run --queue /var/spool/flowsubmit",
        _queue_options(),
    )
    _add_settings_flags(run)

    enqueue = _command(
        commands,
        "enqueue",
        "validate a job and drop it atomically into the queue; prints its job id",
        "flowsubmit enqueue --queue /var/spool/flowsubmit nightly.json",
        _queue_options(),
    )
    enqueue.add_argument("file", metavar="FILE", help="job file, or - for standard input")
    enqueue.add_argument(
        "--create", action="store_true", help="make the queue directory if it does not exist"
    )
    enqueue.add_argument(
        "--priority",
        type=_priority,
        metavar="N",
        help=f"set the job's priority ({PRIORITY_MIN} to {PRIORITY_MAX}, higher first; docs/jobs.md)",
    )
    enqueue.add_argument(
        "--check",
        action="store_true",
        help="ask Prefect first: the deployment exists and every run's parameters fit its schema",
    )
    enqueue.add_argument(
        "--wait",
        action="store_true",
        help="wait for the job's end and print its summary; exit 0 only if every run completed",
    )

    validate = _command(
        commands,
        "validate",
        "check job files; every problem is listed (exit 0, or 2 if any file is bad)",
        "flowsubmit validate jobs/*.json",
    )
    validate.add_argument(
        "files", nargs="+", metavar="FILE", help="job files or glob patterns; - for standard input"
    )
    validate.add_argument(
        "--json", action="store_true", help="print one JSON document (for editors and CI)"
    )
    validate.add_argument(
        "--policy",
        action="store_true",
        help="also check the daemon's policy (allowed_deployments, allowed_job_variables, "
        "[[producers]]; from --config and FLOWSUBMIT_*) for the user running this",
    )
    _config_option(validate)

    status = _command(
        commands,
        "status",
        "jobs per folder, the progress and owner of those in processing, queued ids, last rejections",
        "flowsubmit status --queue /var/spool/flowsubmit --watch",
        _queue_options(),
    )
    status.add_argument(
        "--watch", action="store_true", help="refresh in place (progress bars on a terminal)"
    )
    status.add_argument(
        "--interval", type=float, default=1.0, metavar="S", help="--watch refresh period (1 s)"
    )
    status.add_argument(
        "--json", action="store_true", help="print one JSON document (docs/operations.md)"
    )

    cancel = _command(
        commands,
        "cancel",
        "cancel a job: one still in incoming/ at once (no run is created), a running one by the daemon",
        "flowsubmit cancel --queue /var/spool/flowsubmit nightly-tables-2026-11-26",
        _queue_options(),
    )
    cancel.add_argument("job_id", metavar="JOB_ID")
    cancel.add_argument(
        "--wait", action="store_true", help="wait until the job has ended and print its summary"
    )

    _command(
        commands,
        "health",
        "exit 0 when a daemon on this host serves the queue and passed its loop recently, else 1 and why",
        "flowsubmit health --queue /var/spool/flowsubmit",
        _queue_options(),
    )

    prune = _command(
        commands,
        "prune",
        "remove the files of finished and rejected jobs that ended longer ago than AGE",
        "flowsubmit prune --queue /var/spool/flowsubmit --older-than 7d --dry-run",
        _queue_options(),
    )
    prune.add_argument(
        "--older-than", required=True, metavar="AGE", help="e.g. 7d, 12h, 30m (s, m, h, d, w)"
    )
    prune.add_argument("--dry-run", action="store_true", help="list what would go; remove nothing")

    _command(commands, "schema", "print the job JSON Schema", "flowsubmit schema > job.schema.json")

    demo = _command(
        commands,
        "demo",
        "start a local Prefect server, serve an example flow, run the daemon and one example job",
        "flowsubmit demo --runs 8",
        description=(
            "Starts a local Prefect server (SQLite in a temporary home, loopback only), serves the\n"
            "example flow process-table-etl, runs the daemon on a temporary queue, enqueues one job\n"
            "of N runs (tables 1 to N; tables 7 and 17, when N reaches them, fail on purpose),\n"
            "prints the daemon's logs and the summary, then stops everything it started.\n"
            "The queue, with the result file, is kept."
        ),
    )
    demo.add_argument(
        "--runs",
        type=int,
        default=20,
        metavar="N",
        help="runs in the example job (default: 20)",
    )
    demo.add_argument(
        "--log-format", choices=["json", "console"], default="json", help="the daemon's log format"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code (0 success, 1 runtime failure, 2 bad usage or input)."""
    arguments = sys.argv[1:] if argv is None else list(argv)
    return guarded(lambda: _dispatch(arguments), debug="--debug" in arguments)


def _dispatch(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return int(_COMMANDS[args.command](args))


# -- shared pieces ------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    """The settings from the flags this command has, the environment and ``--config``."""
    flags = {name: getattr(args, name, None) for name in Settings.model_fields}
    return Settings.load(getattr(args, "config", None), **flags)


#: The settings that make up the policy: given any of them, ``enqueue`` checks it (#14).
_POLICY_SETTINGS = frozenset(
    {
        "allowed_deployments",
        "allowed_job_variables",
        "producers",
        "allow_prefect_kinds",
        "producer_max_running_jobs",
        "producer_max_runs_in_flight",
        "producer_max_priority",
        "producer_max_timeout_s",
        "producer_default_timeout_s",
    }
)


def _policy_problems(job: Job, settings: Settings, *, full: bool) -> list[JobRejected]:
    """How ``job`` breaks the policy for the user running this (``enqueue`` writes the file as them).

    Without ``full`` only the reserved tags, which no setting allows, and parameters
    Prefect would fill in (unless ``allow_prefect_kinds``); with it, the whole policy the
    settings describe, as the daemon holding them would judge it.
    """
    if not full:
        return reserved_tag_problems(job, allow_prefect_kinds=settings.allow_prefect_kinds)
    return settings.policy().problems(job, current_producer())


# -- commands -----------------------------------------------------------------------------


def _cmd_run(args: argparse.Namespace) -> int:
    settings = _settings(args)
    open_queue(settings, create=True)
    configured_api_url()  # refuse before anything could start Prefect's temporary server
    from flowsubmit.service.daemon import (
        Service,  # Prefect is imported only once the arguments are good
    )

    logs.configure(settings.log_format, settings.log_level)
    asyncio.run(Service(settings).run())
    return EXIT_OK


def _cmd_validate(args: argparse.Namespace) -> int:
    settings = _settings(args)
    policy = partial(_policy_problems, settings=settings, full=args.policy)
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


def _priority(text: str) -> int:
    """``enqueue --priority``: a whole number in the job field's range."""
    try:
        value = int(text)
    except ValueError:
        value = PRIORITY_MAX + 1
    if not PRIORITY_MIN <= value <= PRIORITY_MAX:
        raise argparse.ArgumentTypeError(
            f"must be a whole number from {PRIORITY_MIN} to {PRIORITY_MAX}, not {text!r}"
        )
    return value


def _cmd_enqueue(args: argparse.Namespace) -> int:
    settings = _settings(args)
    queue = open_queue(
        settings, create=args.create, hint="check the path, or give --create to make a new queue"
    )
    # The daemon's policy is known when its settings were given (--config, FLOWSUBMIT_*).
    full = args.config is not None or bool(_POLICY_SETTINGS & settings.model_fields_set)
    checked = check_file(
        args.file, settings, partial(_policy_problems, settings=settings, full=full)
    )
    if checked.job is None:
        print_problems(checked.problems)
        return EXIT_USAGE
    job, data = checked.job, checked.data
    if args.check:
        try:
            asyncio.run(ask_prefect(job))
        except JobRejected as exc:
            raise exc.with_file(checked.file) from None
    # Give the drop its id now, and print the job's name in the queue (``ID@USER`` for a
    # producer other than the queue's owner): the name the daemon, status and cancel use.
    job_id = job.id or new_job_id()
    me = current_producer()
    name = queue.scoped_id(job_id, me.uid, me.user)
    if job.id is not None:
        refuse_known_id(queue, job_id, checked.file, name)
    if job.id is None or args.priority is not None:
        document = {"id": job_id, **json.loads(data.decode("utf-8-sig"))}
        if args.priority is not None:
            document["priority"] = args.priority
            # The priority asked for on the command line is judged as the file's would be.
            problems = _policy_problems(
                job.model_copy(update={"priority": args.priority}), settings, full=full
            )
            if problems:
                print_problems([p.with_file(checked.file) for p in problems])
                return EXIT_USAGE
        data = json.dumps(document, indent=2).encode()
    dropped = drop(queue, data, job_id)
    print(name, flush=True)
    if not args.wait:
        return EXIT_OK
    return _report_end(name, *wait_for_end(queue, name, dropped))


def _report_end(job_id: str, folder: str, ended: JobResult | JobRejected) -> int:
    """Print how a waited-for job ended; 0 only if every run completed."""
    if isinstance(ended, JobRejected):
        raise ended
    print(ended.summary.line)
    if ended.status is JobStatus.SUCCEEDED:
        return EXIT_OK
    error = f": {ended.error}" if ended.error else ""
    raise CliError(
        f"job {job_id}", f"{ended.status.value}{error} ({folder}/{job_id}.result.json)", code=1
    )


def _cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.live import Live

    from flowsubmit.ops.status import document, render

    settings = _settings(args)
    queue = open_queue(settings, hint="is it the daemon's --queue?")
    if args.json:
        print(json.dumps(document(queue, max_job_bytes=settings.max_job_bytes), indent=2))
        return EXIT_OK
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, soft_wrap=True, width=200)  # whole lines in a pipe
    if not args.watch:
        console.print(
            render(document(queue, max_job_bytes=settings.max_job_bytes), bars=console.is_terminal)
        )
        return EXIT_OK
    if args.interval <= 0:
        raise CliError("status --interval", f"must be above 0, not {args.interval:g}")
    try:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                live.update(
                    render(
                        document(queue, max_job_bytes=settings.max_job_bytes),
                        bars=console.is_terminal,
                    ),
                    refresh=True,
                )
                time.sleep(args.interval)
    except KeyboardInterrupt:
        return EXIT_OK  # the way to leave --watch


def _cmd_cancel(args: argparse.Namespace) -> int:
    settings = _settings(args)
    queue = open_queue(settings, hint="is it the daemon's --queue?")
    print(cancel(queue, args.job_id, settings.max_job_bytes), flush=True)
    if not args.wait:
        return EXIT_OK
    folder, ended = wait_for_end(queue, args.job_id)
    print(f"ended in {folder}/" if isinstance(ended, JobRejected) else ended.summary.line)
    return EXIT_OK


def _cmd_health(args: argparse.Namespace) -> int:
    from flowsubmit.ops.heartbeat import health

    try:
        queue = open_queue(_settings(args), hint="is it the daemon's --queue?")
    except CliError as exc:  # exit 1, not 2: Docker reserves 2 in a HEALTHCHECK
        raise CliError(exc.what, exc.why, code=EXIT_ERROR, hint=exc.hint) from None
    healthy, line = health(queue.root)
    if not healthy:
        raise CliError("health", line, code=EXIT_ERROR)
    print(line)
    return EXIT_OK


def _cmd_prune(args: argparse.Namespace) -> int:
    from flowsubmit.ops.retention import parse_age, prune

    try:
        older_than_s = parse_age(args.older_than)
    except ValueError as exc:
        raise CliError("prune --older-than", str(exc)) from None
    queue = open_queue(_settings(args), hint="is it the daemon's --queue?")
    logs.configure(
        "console", "info", cache=False
    )  # a few lines; and main() may run again in-process
    removed = prune(queue.root, older_than_s, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    print(f"{verb} {len(removed)} job(s), {sum(len(j.files) for j in removed)} file(s)")
    return EXIT_OK


def _cmd_schema(_: argparse.Namespace) -> int:
    print(json.dumps(job_schema(), indent=2))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from flowsubmit.cli.demo import run_demo

    if args.runs < 1:
        raise CliError("demo --runs", f"must be at least 1, not {args.runs}")
    try:
        return run_demo(runs=args.runs, log_format=args.log_format)
    except KeyboardInterrupt:
        print("interrupted: everything the demo started has been stopped", file=sys.stderr)
        return EXIT_INTERRUPTED


_COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _cmd_run,
    "enqueue": _cmd_enqueue,
    "validate": _cmd_validate,
    "status": _cmd_status,
    "cancel": _cmd_cancel,
    "health": _cmd_health,
    "prune": _cmd_prune,
    "schema": _cmd_schema,
    "demo": _cmd_demo,
}
