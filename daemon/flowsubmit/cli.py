"""The ``flowsubmit`` command line: run, enqueue, validate, status, cancel, schema, demo."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from flowsubmit import logs
from flowsubmit.errors import JobRejected
from flowsubmit.jobs import Job, job_schema, parse_job
from flowsubmit.queue import FOLDERS, Queue, new_job_id
from flowsubmit.settings import Settings

__all__ = ["main"]

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per settings field, with the field's description as help (one source of truth)."""
    group = parser.add_argument_group(
        "settings (also FLOWSUBMIT_<NAME> and the --config TOML file)"
    )
    group.add_argument("--config", type=Path, help="TOML file of settings")
    for name, field in Settings.model_fields.items():
        if name in ("queue", "producers"):  # producers: TOML tables (or JSON in the env) only
            continue
        flag = "--" + name.replace("_", "-")
        if field.annotation == list[str]:  # repeat the flag: --allowed-deployments 'etl/*' ...
            group.add_argument(
                flag, dest=name, action="append", help=f"{field.description} Repeatable."
            )
        elif field.annotation is bool:
            group.add_argument(
                flag,
                dest=name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=field.description,
            )
        else:
            group.add_argument(
                flag,
                dest=name,
                default=None,
                metavar=name.upper(),
                help=f"{field.description} (default: {field.default})",
            )


def _settings(args: argparse.Namespace) -> Settings:
    flags = {name: getattr(args, name, None) for name in Settings.model_fields}
    return Settings.load(getattr(args, "config", None), **flags)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowsubmit",
        description="Fan out job files into Prefect deployment runs, and fan their final states back in.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--queue", type=Path, help="queue directory")
    _add_settings_flags(run)

    enqueue = commands.add_parser(
        "enqueue", help="validate a job and drop it atomically into the queue"
    )
    enqueue.add_argument("--queue", type=Path, required=True)
    enqueue.add_argument("file", help="job file, or - for standard input")

    validate = commands.add_parser(
        "validate", help="check a job file (exit 0, or 2 with the error)"
    )
    validate.add_argument("file")

    status = commands.add_parser(
        "status", help="jobs per folder, and the progress of those in processing"
    )
    status.add_argument("--queue", type=Path, required=True)

    cancel = commands.add_parser("cancel", help="ask the daemon to cancel a job's runs")
    cancel.add_argument("--queue", type=Path, required=True)
    cancel.add_argument("job_id")

    commands.add_parser("schema", help="print the job JSON Schema")

    demo = commands.add_parser(
        "demo", help="local Prefect server + example flow + daemon + a 20-run job"
    )
    demo.add_argument("--runs", type=int, default=20)
    demo.add_argument(
        "--log-format", choices=["json", "console"], default="json", help="the daemon's log format"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return int(_COMMANDS[args.command](args))
    except (ValidationError, FileNotFoundError) as exc:
        print(f"flowsubmit: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _cmd_run(args: argparse.Namespace) -> int:
    from flowsubmit.service import Service

    settings = _settings(args)
    if settings.queue is None:
        print("flowsubmit run: --queue (or FLOWSUBMIT_QUEUE) is required", file=sys.stderr)
        return EXIT_USAGE
    logs.configure(settings.log_format, settings.log_level)
    asyncio.run(Service(settings).run())
    return EXIT_OK


def _read_source(file: str) -> tuple[str, bytes]:
    if file == "-":
        return "<stdin>", sys.stdin.buffer.read()
    return file, Path(file).read_bytes()


def _parse_source(file: str) -> tuple[str, bytes, Job] | None:
    """Read and parse a job file (or stdin); print the rejection and return None if invalid."""
    name, data = _read_source(file)
    try:
        return name, data, parse_job(data, file=name, max_runs=Settings().max_runs_per_job)
    except JobRejected as exc:
        print(f"invalid: {exc.message}", file=sys.stderr)
        return None


def _cmd_validate(args: argparse.Namespace) -> int:
    parsed = _parse_source(args.file)
    if parsed is None:
        return EXIT_USAGE
    name, _, job = parsed
    print(f"ok: {name}: {job.total_runs} runs")
    return EXIT_OK


def _cmd_enqueue(args: argparse.Namespace) -> int:
    parsed = _parse_source(args.file)
    if parsed is None:
        return EXIT_USAGE
    _, data, job = parsed
    if job.id is None:
        # Give the drop its id now, so that the id printed is the id the daemon uses.
        job_id = new_job_id()
        document = json.loads(data.decode("utf-8-sig"))
        data = json.dumps({"id": job_id, **document}, indent=2).encode()
    else:
        job_id = job.id
    queue = Queue(args.queue)
    queue.ensure()
    queue.enqueue(data, job_id)
    print(job_id)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    queue = Queue(args.queue)
    if not queue.incoming.is_dir():
        print(f"flowsubmit status: {args.queue} is not a queue directory", file=sys.stderr)
        return EXIT_ERROR
    counts = {folder: len(_job_files(args.queue / folder)) for folder in FOLDERS if folder != "tmp"}
    print("  ".join(f"{folder}: {n}" for folder, n in counts.items()))
    for path in queue.running():
        progress = queue.progress(path.stem)
        total = "?" if progress.total is None else progress.total
        print(
            f"  {path.stem}: {progress.finished}/{total} runs finished, {progress.created} created"
        )
    return EXIT_OK


def _job_files(folder: Path) -> list[Path]:
    """Job files of a folder: ``*.json`` but not results, error reports or hidden files."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.glob("*.json")
        if not p.name.startswith(".") and not p.name.endswith((".result.json", ".error.json"))
    )


def _cmd_cancel(args: argparse.Namespace) -> int:
    queue = Queue(args.queue)
    if not queue.request_cancel(args.job_id):
        print(f"flowsubmit cancel: no job {args.job_id!r} in {queue.processing}", file=sys.stderr)
        return EXIT_ERROR
    print(f"cancel requested for {args.job_id}")
    return EXIT_OK


def _cmd_schema(_: argparse.Namespace) -> int:
    print(json.dumps(job_schema(), indent=2))
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from flowsubmit.demo import run_demo

    try:
        return run_demo(runs=args.runs, log_format=args.log_format)
    except KeyboardInterrupt:
        print("interrupted: everything the demo started has been stopped", file=sys.stderr)
        return 130


_COMMANDS: dict[str, Any] = {
    "run": _cmd_run,
    "enqueue": _cmd_enqueue,
    "validate": _cmd_validate,
    "status": _cmd_status,
    "cancel": _cmd_cancel,
    "schema": _cmd_schema,
    "demo": _cmd_demo,
}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
