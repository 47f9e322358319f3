"""The misuse table: every wrong way to call ``flowsubmit`` gets one clear line, a documented exit code, and never a traceback.

The cases run as real processes (forks of one warmed-up runner, ``tests/support/clirunner.py``;
``setpriv`` for the ones run as an unprivileged user), in batches, so the table stays
fast. Only the ``--check`` cases need the Prefect server.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flowsubmit.local.localserver import LocalServer, free_port
from flowsubmit.queue.folders import FOLDERS, Queue
from tests.support import ROOT
from tests.support.flows import DRIVEN

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"]
GOOD = {"deployment": "etl/etl-deployment", "runs": [{}]}
QUEUE_HINT = "check the path, or give --create to make a new queue"


@dataclass
class Case:
    """One command line, how it is run, and exactly what it must answer."""

    name: str
    argv: list[str]
    code: int
    first_line: str
    env: dict[str, str] = field(default_factory=dict)
    stdin: str | None = None
    stdout: str | None = None
    as_nobody: bool = False
    #: Variables removed from the environment; such a case runs as a fresh process, since
    #: Prefect reads its settings at import (the runner imported it with them set).
    unset: tuple[str, ...] = ()

    def spec(self, sandbox: Path, base_env: dict[str, str]) -> dict[str, Any]:
        """What the runner needs to run this case in ``sandbox``."""
        command = [sys.executable, "-m", "flowsubmit.cli"]
        if self.as_nobody:
            command = [*NOBODY, *command]
        env = {k: v for k, v in {**base_env, **self.env}.items() if k not in self.unset}
        return {
            "argv": self.argv,
            "cwd": str(sandbox),
            "env": env,
            "stdin": self.stdin,
            "stdout": self.stdout,
            "exec": command if self.as_nobody or self.unset else None,
        }


def _write(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Path]:
    """Files, folders and queues for the cases, readable by the unprivileged user (not under pytest's 0700 tmp)."""
    root = Path(tempfile.mkdtemp(prefix="flowsubmit-misuse-"))
    root.chmod(0o755)
    _write(root / "good.json", json.dumps(GOOD))
    for name, job_id in (("done-id", "ran-before"), ("running-id", "running-now")):
        _write(root / f"{name}.json", json.dumps({"id": job_id, **GOOD}))
    _write(root / "waiting-id.json", json.dumps({"id": "waiting-now", **GOOD}))
    _write(root / "bad.json", json.dumps({"retries": 50, **GOOD, "max_concurency": 3}))
    _write(root / "notjson.json", "{")
    _write(root / "secret.json", json.dumps(GOOD), 0o600)
    _write(root / "secret.toml", "", 0o600)
    _write(root / "c-typo.toml", 'log_formt = "json"\n')
    _write(root / "c-bad.toml", "max_concurrent_jobs = 0\n")
    _write(root / "c-broken.toml", "log_format = \n")
    _write(root / "c-list.toml", 'allowed_deployments = "snooze/*"\n')
    _write(root / "qfile", "")
    (root / "adir").mkdir()
    (root / "notq").mkdir()
    for name in ("qbadinc", "qbadinc2"):
        for folder in FOLDERS:
            (root / name / folder).mkdir(parents=True)
        (root / name / "incoming").rmdir()
        _write(root / name / "incoming", "")
    queue = Queue(root / "queue")
    queue.ensure()
    for path in (queue.root, *(queue.root / f for f in ("tmp", "incoming"))):
        path.chmod(0o755)
    _write(queue.done / "ran-before.json", json.dumps({"id": "ran-before", **GOOD}))
    _write(queue.done / "ran-before.result.json", json.dumps({"status": "succeeded"}))
    _write(queue.processing / "running-now.json", json.dumps({"id": "running-now", **GOOD}))
    _write(queue.incoming / "waiting-now.json", json.dumps({"id": "waiting-now", **GOOD}))
    yield root
    shutil.rmtree(root)


def _run(cases: list[Case], sandbox: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """Run a batch of cases in one runner process (whose environment Prefect reads at import)."""
    specs, outcomes = sandbox / ".cases.json", sandbox / ".outcomes.json"
    specs.write_text(json.dumps([case.spec(sandbox, env) for case in cases]))
    subprocess.run(
        [sys.executable, "-m", "tests.support.clirunner", str(specs), str(outcomes)],
        env=env,
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    return json.loads(outcomes.read_text())  # type: ignore[no-any-return]


def _check(cases: list[Case], outcomes: list[dict[str, Any]]) -> None:
    """Every case: its exit code, its exact first stderr line, and no traceback anywhere."""
    seen = [
        (
            c.name,
            o["code"],
            (o["stderr"].splitlines() or [""])[0],
            "Traceback" in o["stderr"] + o["stdout"],
        )
        for c, o in zip(cases, outcomes, strict=True)
    ]
    expected = [(c.name, c.code, c.first_line, False) for c in cases]
    wrong = [f"{s!r}\n   expected {e!r}" for s, e in zip(seen, expected, strict=True) if s != e]
    assert not wrong, "\n".join(wrong)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLOWSUBMIT_")}
    return {**env, "PYTHONPATH": f"{ROOT / 'daemon'}:{ROOT}", **extra}


ARGUMENTS = [
    Case("no command", [], 2, "flowsubmit: usage: the following arguments are required: COMMAND"),
    Case(
        "validate without files",
        ["validate"],
        2,
        "flowsubmit: validate: the following arguments are required: FILE",
    ),
    Case(
        "enqueue without a file",
        ["enqueue", "--queue", "queue"],
        2,
        "flowsubmit: enqueue: the following arguments are required: FILE",
    ),
    Case(
        "cancel without an id",
        ["cancel", "--queue", "queue"],
        2,
        "flowsubmit: cancel: the following arguments are required: JOB_ID",
    ),
    Case(
        "unknown option",
        ["status", "--queue", "queue", "--bogus"],
        2,
        "flowsubmit: usage: unrecognized arguments: --bogus",
    ),
    Case(
        "option without its value",
        ["run", "--queue", "queue", "--max-concurrent-jobs"],
        2,
        "flowsubmit: run: argument --max-concurrent-jobs: expected one argument",
    ),
    Case(
        "not a number",
        ["demo", "--runs", "x"],
        2,
        "flowsubmit: demo: argument --runs: invalid int value: 'x'",
    ),
    Case(
        "no runs", ["demo", "--runs", "0"], 2, "flowsubmit: demo --runs: must be at least 1, not 0"
    ),
    Case(
        "not a choice",
        ["demo", "--log-format", "xml"],
        2,
        "flowsubmit: demo: argument --log-format: invalid choice: 'xml' (choose from 'json', 'console')",
    ),
    Case("no queue", ["status"], 2, "flowsubmit: --queue: no queue directory given"),
    Case("no queue for run", ["run"], 2, "flowsubmit: --queue: no queue directory given"),
]

SETTINGS = [
    Case(
        "flag: not allowed",
        ["run", "--queue", "queue", "--log-format", "pretty"],
        2,
        "flowsubmit: --log-format: must be 'auto', 'json' or 'console', not 'pretty'",
    ),
    Case(
        "flag: not a number",
        ["run", "--queue", "queue", "--max-concurrent-jobs", "abc"],
        2,
        "flowsubmit: --max-concurrent-jobs: must be a whole number, not 'abc'",
    ),
    Case(
        "flag: out of range",
        ["run", "--queue", "queue", "--poll-interval-s", "-1"],
        2,
        "flowsubmit: --poll-interval-s: must be more than 0, not '-1'",
    ),
    Case(
        "env: not allowed",
        ["status", "--queue", "queue"],
        2,
        "flowsubmit: FLOWSUBMIT_LOG_LEVEL: must be 'debug', 'info', 'warning' or 'error', not 'loud'",
        env={"FLOWSUBMIT_LOG_LEVEL": "loud"},
    ),
    Case(
        "env: out of range",
        ["validate", "good.json"],
        2,
        "flowsubmit: FLOWSUBMIT_MAX_RUNS_PER_JOB: must be at least 1, not '0'",
        env={"FLOWSUBMIT_MAX_RUNS_PER_JOB": "0"},
    ),
    Case(
        "env: not a boolean",
        ["status", "--queue", "queue"],
        2,
        "flowsubmit: FLOWSUBMIT_FORCE_POLLING: must be true or false, not 'maybe'",
        env={"FLOWSUBMIT_FORCE_POLLING": "maybe"},
    ),
    Case(
        "env: a list not written as JSON",
        ["run", "--queue", "queue"],
        2,
        """flowsubmit: FLOWSUBMIT_ALLOWED_DEPLOYMENTS: must be a JSON list of globs, e.g. '["etl/*"]'""",
        env={"FLOWSUBMIT_ALLOWED_DEPLOYMENTS": "snooze/*"},
    ),
    Case(
        "env: a key list not written as JSON",
        ["status", "--queue", "queue"],
        2,
        """flowsubmit: FLOWSUBMIT_ALLOWED_JOB_VARIABLES: must be a JSON list of keys, e.g. '["image"]'""",
        env={"FLOWSUBMIT_ALLOWED_JOB_VARIABLES": "env"},
    ),
    Case(
        "env: producer rules not written as JSON",
        ["validate", "good.json"],
        2,
        "flowsubmit: FLOWSUBMIT_PRODUCERS: must be a JSON list of rules,"
        """ e.g. '[{"user": "alice", "allowed_deployments": ["etl/*"]}]'""",
        env={"FLOWSUBMIT_PRODUCERS": "oops"},
    ),
    Case(
        "file: a list written as a string",
        ["status", "--queue", "queue", "--config", "c-list.toml"],
        2,
        """flowsubmit: c-list.toml: allowed_deployments: must be a list of globs, e.g. allowed_deployments = ["etl/*"]""",
    ),
    Case(
        "flag wins over env",
        ["run", "--queue", "queue", "--log-format", "pretty"],
        2,
        "flowsubmit: --log-format: must be 'auto', 'json' or 'console', not 'pretty'",
        env={"FLOWSUBMIT_LOG_FORMAT": "xml"},
    ),
    Case(
        "file: unknown key",
        ["status", "--queue", "queue", "--config", "c-typo.toml"],
        2,
        "flowsubmit: c-typo.toml: log_formt: unknown setting",
    ),
    Case(
        "file: out of range",
        ["status", "--queue", "queue", "--config", "c-bad.toml"],
        2,
        "flowsubmit: c-bad.toml: max_concurrent_jobs: must be at least 1, not 0",
    ),
    Case(
        "file: not TOML",
        ["status", "--queue", "queue", "--config", "c-broken.toml"],
        2,
        "flowsubmit: c-broken.toml: not valid TOML: Invalid value (at line 1, column 14)",
    ),
    Case(
        "file: missing",
        ["validate", "good.json", "--config", "nope.toml"],
        2,
        "flowsubmit: --config nope.toml: no such file",
    ),
    Case(
        "file: a directory",
        ["validate", "good.json", "--config", "adir"],
        2,
        "flowsubmit: --config adir: is a directory, not a TOML file",
    ),
]

PATHS = [
    Case(
        "validate a directory",
        ["validate", "adir/"],
        2,
        "flowsubmit: adir/: is a directory (give the files in it: adir/*.json)",
    ),
    Case(
        "validate a missing file",
        ["validate", "nope.json"],
        2,
        "flowsubmit: nope.json: no such file",
    ),
    Case(
        "validate a glob matching nothing",
        ["validate", "*.nomatch"],
        2,
        "flowsubmit: *.nomatch: no file matches this pattern",
    ),
    Case(
        "validate not JSON",
        ["validate", "good.json", "notjson.json"],
        2,
        "flowsubmit: notjson.json: not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2",
    ),
    Case(
        "validate a bad job",
        ["validate", "bad.json"],
        2,
        "flowsubmit: bad.json: field 'retries': must be at most 10, not 50",
    ),
    Case(
        "validate too large",
        ["validate", "good.json"],
        2,
        "flowsubmit: good.json: the file is larger than max_job_bytes (10)",
        env={"FLOWSUBMIT_MAX_JOB_BYTES": "10"},
    ),
    Case(
        "enqueue to a missing queue",
        ["enqueue", "--queue", "nope", "good.json"],
        2,
        "flowsubmit: queue nope: does not exist",
    ),
    Case(
        "enqueue to a file",
        ["enqueue", "--queue", "qfile", "good.json"],
        2,
        "flowsubmit: queue qfile: is not a directory",
    ),
    Case(
        "enqueue to a plain directory",
        ["enqueue", "--queue", "notq", "good.json"],
        2,
        "flowsubmit: queue notq: is not a queue directory (it has no tmp/)",
    ),
    Case(
        "enqueue where incoming is a file",
        ["enqueue", "--queue", "qbadinc", "good.json"],
        2,
        "flowsubmit: queue qbadinc: incoming/ is not a directory",
    ),
    Case(
        "enqueue --create where incoming is a file",
        ["enqueue", "--create", "--queue", "qbadinc2", "good.json"],
        2,
        "flowsubmit: queue qbadinc2: incoming/ is not a directory",
    ),
    Case(
        "run where incoming is a file",
        ["run", "--queue", "qbadinc2"],
        2,
        "flowsubmit: queue qbadinc2: incoming/ is not a directory",
    ),
    Case(
        "status of a plain directory",
        ["status", "--queue", "notq"],
        2,
        "flowsubmit: queue notq: is not a queue directory (it has no tmp/)",
    ),
    Case(
        "queue from the environment",
        ["status"],
        2,
        "flowsubmit: queue nope: does not exist",
        env={"FLOWSUBMIT_QUEUE": "nope"},
    ),
    Case(
        "enqueue a missing file",
        ["enqueue", "--queue", "queue", "nope.json"],
        2,
        "flowsubmit: nope.json: no such file",
    ),
    Case(
        "enqueue a directory",
        ["enqueue", "--queue", "queue", "adir"],
        2,
        "flowsubmit: adir: is a directory (give the files in it: adir/*.json)",
    ),
    Case(
        "enqueue from a closed stdin",
        ["enqueue", "--queue", "queue", "-"],
        2,
        "flowsubmit: <stdin>: standard input is closed",
        stdin="closed",
    ),
    Case(
        "enqueue not JSON from stdin",
        ["enqueue", "--queue", "queue", "-"],
        2,
        "flowsubmit: <stdin>: not valid JSON: Expecting value at line 1 column 1",
        stdin="nope",
    ),
]

REFUSALS = [
    Case(
        "enqueue an id that ran",
        ["enqueue", "--queue", "queue", "done-id.json"],
        2,
        "flowsubmit: done-id.json: field 'id': duplicate job id: 'ran-before' already ran as done/ran-before.json",
    ),
    Case(
        "enqueue an id that runs",
        ["enqueue", "--queue", "queue", "running-id.json"],
        2,
        "flowsubmit: running-id.json: field 'id': duplicate job id: 'running-now' is already running as processing/running-now.json",
    ),
    Case(
        "enqueue an id that waits",
        ["enqueue", "--queue", "queue", "waiting-id.json"],
        2,
        "flowsubmit: waiting-id.json: field 'id': duplicate job id: 'waiting-now' is already waiting in incoming/",
    ),
    Case(
        "cancel an unknown job",
        ["cancel", "--queue", "queue", "nope"],
        2,
        "flowsubmit: cancel nope: no such job in incoming/, processing/, done/, failed/ or rejected/",
    ),
    Case(
        "cancel a job that ended",
        ["cancel", "--queue", "queue", "ran-before"],
        1,
        "flowsubmit: cancel ran-before: the job has already ended: succeeded (done/)",
    ),
]

PIPES = [
    Case(
        "schema into a closed pipe",
        ["schema"],
        1,
        "flowsubmit: standard output: closed by the reader before everything was written",
        stdout="closed-pipe",
    ),
    Case(
        "validate --json into a closed pipe",
        ["validate", "--json", "good.json"],
        1,
        "flowsubmit: standard output: closed by the reader before everything was written",
        stdout="closed-pipe",
    ),
]

UNPRIVILEGED = [
    Case(
        "validate an unreadable file",
        ["validate", "secret.json"],
        2,
        "flowsubmit: secret.json: permission denied",
        as_nobody=True,
    ),
    Case(
        "enqueue into a queue not writable",
        ["enqueue", "--queue", "queue", "good.json"],
        1,
        "flowsubmit: queue queue: may not write in tmp/ (permission denied)",
        as_nobody=True,
    ),
    Case(
        "create a queue where one may not",
        ["enqueue", "--create", "--queue", "newq", "good.json"],
        1,
        "flowsubmit: queue newq: may not create newq (permission denied)",
        as_nobody=True,
    ),
    Case(
        "an unreadable settings file",
        ["status", "--queue", "queue", "--config", "secret.toml"],
        2,
        "flowsubmit: --config secret.toml: permission denied",
        as_nobody=True,
    ),
]

PREFECT_DOWN = [
    Case(
        "enqueue --check with Prefect down",
        ["enqueue", "--check", "--queue", "queue", "good.json"],
        1,
        "flowsubmit: Prefect: its API does not answer",
    ),
]

NO_PREFECT = "flowsubmit: PREFECT_API_URL: not set: set it in the environment (export PREFECT_API_URL=http://HOST:4200/api) or in Prefect's profile (prefect config set PREFECT_API_URL=http://HOST:4200/api); flowsubmit never starts a temporary Prefect server of its own"

PREFECT_DOWN += [
    Case(
        "run without a Prefect API",
        ["run", "--queue", "queue"],
        2,
        NO_PREFECT,
        unset=("PREFECT_API_URL",),
    ),
    Case(
        "enqueue --check without a Prefect API",
        ["enqueue", "--check", "--queue", "queue", "good.json"],
        2,
        NO_PREFECT,
        unset=("PREFECT_API_URL",),
    ),
]

TABLE = ARGUMENTS + SETTINGS + PATHS + REFUSALS + PIPES + UNPRIVILEGED + PREFECT_DOWN


DEBUG = Case(
    "--debug", ["status", "--debug", "--queue", "notq"], 2, "Traceback (most recent call last):"
)


def test_the_misuse_table(sandbox: Path) -> None:
    """Each misuse, run as a real process: documented exit code, exact first line on stderr, no
    traceback; with --debug the traceback comes first and the same lines end it."""
    assert len(TABLE) >= 40
    dead = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there: Prefect is down
    *outcomes, debug = _run([*TABLE, DEBUG], sandbox, _env(PREFECT_API_URL=dead))
    _check(TABLE, outcomes)
    assert sorted(p.name for p in (sandbox / "queue" / "incoming").iterdir()) == [
        "waiting-now.json"
    ]
    assert list((sandbox / "queue").rglob("*.cancel")) == []
    lines = debug["stderr"].splitlines()
    assert (debug["code"], lines[0], lines[-2:]) == (
        DEBUG.code,
        DEBUG.first_line,
        [
            "flowsubmit: queue notq: is not a queue directory (it has no tmp/)",
            "  hint: is it the daemon's --queue?",
        ],
    )


CHECKED = [
    Case(
        "--check: unknown deployment",
        ["enqueue", "--check", "--queue", "queue", "unknown.json"],
        2,
        "flowsubmit: unknown.json: field 'deployment': deployment 'etl/nowhere' not found or unreadable: HTTP 404: Deployment not found",
    ),
    Case(
        "--check: parameter of the wrong type",
        ["enqueue", "--check", "--queue", "queue", "wrong-type.json"],
        2,
        "flowsubmit: wrong-type.json: field 'parameters.table': run 1: the deployment's parameter schema rejects it: 'x' is not of type 'integer'",
    ),
    Case(
        "--check: unknown parameter",
        ["enqueue", "--check", "--queue", "queue", "unknown-parameter.json"],
        2,
        "flowsubmit: unknown-parameter.json: field 'parameters.tabel': run 0: the flow takes no parameter 'tabel' (it takes: note, table)",
    ),
]


def test_enqueue_check_refuses_what_prefect_would(sandbox: Path, served: LocalServer) -> None:
    """--check asks the real server: a missing deployment or refused parameters exit 2 and nothing is dropped."""
    _write(sandbox / "unknown.json", json.dumps({**GOOD, "deployment": "etl/nowhere"}))
    runs = [{"parameters": {"table": 1}}, {"parameters": {"table": "x"}}]
    _write(sandbox / "wrong-type.json", json.dumps({"deployment": DRIVEN, "runs": runs}))
    unknown = [{"parameters": {"tabel": 1}}]
    _write(sandbox / "unknown-parameter.json", json.dumps({"deployment": DRIVEN, "runs": unknown}))
    before = sorted((sandbox / "queue" / "incoming").iterdir())
    _check(CHECKED, _run(CHECKED, sandbox, _env(**served.env())))
    assert sorted((sandbox / "queue" / "incoming").iterdir()) == before
