"""Bad input at the parser and the queue's file level: exact rejections, and nothing else escapes (no server)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flowsubmit._types import Deployment
from flowsubmit.errors import ClaimLost, JobRejected
from flowsubmit.gateway.convert import first_parameter_problem, parameter_problem
from flowsubmit.jobs.model import MAX_NESTING, Job, parse_job
from flowsubmit.queue.folders import Candidate, Queue, printable_name, safe_name
from flowsubmit.service.intake import CallbackHost, Intake
from flowsubmit.settings import Settings
from tests.support.jobs import make_job

ID_RULE = (
    "an id is 1 to 128 characters: letters A-Z a-z, digits, '.', '_' and '-', "
    "starting with a letter or a digit"
)
DEPLOYMENT_HINT = "`flow-name/deployment-name`; `prefect deployment ls` lists the deployments"


# (name, bytes, field, reason, hint): every kind of bad input the parser refuses, with its exact rejection.
CASES: list[tuple[str, bytes, str | None, str, str | None]] = [
    ("not-json", b"hello", None, "not valid JSON: Expecting value at line 1 column 1", None),
    ("empty", b"", None, "the file is empty", None),
    ("whitespace", b" \n\t\r\n", None, "the file holds only whitespace", None),
    (
        "not-utf8",
        '{"deployment": "a/b", "runs": [{"name": "caf\xe9"}]}'.encode("latin-1"),
        None,
        "the file is not UTF-8 text (byte 0xe9 at offset 44)",
        "save it as UTF-8",
    ),
    (
        "utf16",
        '{"deployment": "a/b"}'.encode("utf-16"),
        None,
        "the file is UTF-16 (it starts with a UTF-16 byte order mark)",
        "save it as UTF-8",
    ),
    ("array", b"[1, 2]", None, "a job must be a JSON object, not a JSON array", None),
    ("string", b'"run it"', None, "a job must be a JSON object, not a JSON string", None),
    ("null", b"null", None, "a job must be a JSON object, not a JSON null", None),
    (
        "trailing",
        make_job(into=bytes) + b" }garbage",
        None,
        "not valid JSON: unexpected data after the end of the JSON value at line 1 column 52",
        None,
    ),
    (
        "duplicate",
        b'{"deployment": "a/b", "runs": [{}], "runs": []}',
        "runs",
        "appears twice in the same JSON object",
        None,
    ),
    (
        "nan",
        b'{"deployment": "a/b", "runs": [{}], "timeout": NaN}',
        None,
        "NaN is not valid JSON",
        "JSON has no NaN or Infinity: use null or a number",
    ),
    (
        "infinite",
        b'{"deployment": "a/b", "runs": [{}], "timeout": 1e999}',
        None,
        "the number 1e999 is too large to be represented",
        None,
    ),
    (
        "digits",
        b'{"deployment": "a/b", "runs": [{"parameters": {"n": ' + b"9" * 5000 + b"}}]}",
        None,
        "a number with 5000 digits is too long (the limit is 4300 digits)",
        None,
    ),
    (
        "surrogate",
        b'{"deployment": "a/b", "runs": [{"parameters": {"s": "\\ud800"}}]}',
        "runs.0.parameters.s",
        "holds a lone UTF-16 surrogate escape (such as \\ud800), which is not text",
        None,
    ),
    (
        "unknown-key",
        make_job(runz=[{}], runs=None, into=bytes),
        "runz",
        "unknown key",
        "did you mean 'runs'?",
    ),
    (
        "unknown-nested-key",
        make_job(runs=[{"paramters": {}}], into=bytes),
        "runs.0.paramters",
        "unknown key",
        "did you mean 'parameters'?",
    ),
    (
        "missing-deployment",
        b'{"runs": [{}]}',
        "deployment",
        "is missing: a job names the deployment to run",
        DEPLOYMENT_HINT,
    ),
    ("runs-not-list", make_job(runs={}, into=bytes), "runs", "must be a list, not an object", None),
    (
        "retries-string",
        make_job(retries="3", into=bytes),
        "retries",
        'must be a whole number, not "3"',
        None,
    ),
    (
        "retries-bool",
        make_job(retries=True, into=bytes),
        "retries",
        "must be a whole number, not true",
        None,
    ),
    (
        "retries-float",
        make_job(retries=1.5, into=bytes),
        "retries",
        "must be a whole number, not 1.5",
        None,
    ),
    ("deployment-null", b'{"deployment": null}', "deployment", "must be a string, not null", None),
    ("tags-number", make_job(tags=[7], into=bytes), "tags.0", "must be a string, not 7", None),
    (
        "on-timeout",
        make_job(on_timeout="explode", into=bytes),
        "on_timeout",
        "must be 'cancel' or 'leave', not \"explode\"",
        None,
    ),
    (
        "no-runs",
        make_job(runs=[], into=bytes),
        "runs",
        "the job has no runs: give `runs` or `matrix`",
        '`"runs": [{}]` is one run with the default parameters',
    ),
    (
        "matrix-empty-list",
        make_job(matrix={"table": []}, runs=None, into=bytes),
        "matrix.table",
        "is an empty list, so the matrix would have no runs",
        None,
    ),
    (
        "retries-negative",
        make_job(retries=-1, into=bytes),
        "retries",
        "must be at least 0, not -1",
        None,
    ),
    (
        "retries-absurd",
        make_job(retries=1000, into=bytes),
        "retries",
        "must be at most 10, not 1000",
        None,
    ),
    (
        "concurrency-zero",
        make_job(max_concurrency=0, into=bytes),
        "max_concurrency",
        "must be at least 1, not 0",
        None,
    ),
    (
        "timeout-absurd",
        make_job(timeout=1e300, into=bytes),
        "timeout",
        "must be at most 2592000, not 1e+300",
        None,
    ),
    (
        "timeout-negative",
        make_job(timeout=-5, into=bytes),
        "timeout",
        "must be more than 0, not -5",
        None,
    ),
    (
        "deep",
        make_job(runs=[{"parameters": {"x": json.loads("[" * 40 + "]" * 40)}}], into=bytes),
        None,
        f"JSON nesting is more than {MAX_NESTING} levels deep (the limit)",
        None,
    ),
    (
        "matrix-explodes",
        make_job(matrix={f"k{i}": list(range(10)) for i in range(5)}, runs=None, into=bytes),
        "matrix",
        "the job expands to 100000 runs, more than the limit of 10000",
        "split it into several jobs or raise max_runs_per_job",
    ),
    (
        "too-many-runs",
        make_job(runs=[{}] * 10_001, into=bytes),
        "runs",
        "the job expands to 10001 runs, more than the limit of 10000",
        "split it into several jobs or raise max_runs_per_job",
    ),
    (
        "id-slash",
        make_job(id="a/b", into=bytes),
        "id",
        'the job id contains a path separator "/"',
        ID_RULE,
    ),
    (
        "id-backslash",
        make_job(id="a\\b", into=bytes),
        "id",
        'the job id contains a path separator "\\\\"',
        ID_RULE,
    ),
    ("id-dotdot", make_job(id="..", into=bytes), "id", 'the job id ".." names a folder', ID_RULE),
    (
        "id-dot-start",
        make_job(id=".hidden", into=bytes),
        "id",
        'the job id starts with "."',
        ID_RULE,
    ),
    (
        "id-control",
        make_job(id="a\nb", into=bytes),
        "id",
        'the job id contains a control character "\\n"',
        ID_RULE,
    ),
    (
        "id-long",
        make_job(id="a" * 129, into=bytes),
        "id",
        "the job id is 129 characters long, more than the limit of 128",
        ID_RULE,
    ),
    ("id-space", make_job(id="my job", into=bytes), "id", 'the job id contains " "', ID_RULE),
    ("id-unicode", make_job(id="café", into=bytes), "id", 'the job id contains "\\u00e9"', ID_RULE),
    (
        "id-empty",
        make_job(id="", into=bytes),
        "id",
        "the job id is empty (leave `id` out to get a fresh one)",
        ID_RULE,
    ),
    (
        "deployment-no-slash",
        make_job(deployment="etl", into=bytes),
        "deployment",
        "must be a flow name and a deployment name joined by one '/', not \"etl\"",
        DEPLOYMENT_HINT,
    ),
    (
        "deployment-two-slashes",
        make_job(deployment="a/b/c", into=bytes),
        "deployment",
        "must be a flow name and a deployment name joined by one '/', not \"a/b/c\"",
        DEPLOYMENT_HINT,
    ),
]


@pytest.mark.parametrize(
    ("data", "field", "reason", "hint"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_each_bad_input_gets_its_exact_rejection(
    data: bytes, field: str | None, reason: str, hint: str | None
) -> None:
    """Every parser-level bad input raises JobRejected with this exact field, reason and hint."""
    with pytest.raises(JobRejected) as info:
        parse_job(data, file="job.json")
    assert info.value.as_dict() == {
        "file": "job.json",
        "field": field,
        "reason": reason,
        "hint": hint,
    }


def test_a_utf8_byte_order_mark_is_accepted_and_ignored() -> None:
    """A UTF-8 BOM (added by some Windows editors) parses to the same job as the file without it."""
    plain = make_job(id="with-bom", into=bytes)
    assert parse_job(b"\xef\xbb\xbf" + plain) == parse_job(plain)


def test_the_user_sees_one_line_naming_file_field_problem_and_hint() -> None:
    """The message printed by `flowsubmit validate` reads as one plain sentence."""
    with pytest.raises(JobRejected) as info:
        parse_job(make_job(id="../etc/passwd", into=bytes), file="nightly.json")
    assert info.value.message == (
        f"nightly.json: field 'id': the job id contains a path separator \"/\" ({ID_RULE})"
    )


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    """Only real nesting is limited: a string full of brackets is an ordinary value."""
    job = parse_job(make_job(runs=[{"parameters": {"s": "[{" * 1000 + '\\"]'}}], into=bytes))
    assert job.runs[0].parameters == {"s": "[{" * 1000 + '\\"]'}


def test_a_bracket_bomb_is_refused_before_parsing() -> None:
    """A megabyte of opening brackets is refused by the depth pre-scan, not by a RecursionError."""
    with pytest.raises(JobRejected) as info:
        parse_job(b"[" * 1_000_000)
    assert info.value.reason == f"JSON nesting is more than {MAX_NESTING} levels deep (the limit)"


def test_nesting_at_the_limit_is_accepted() -> None:
    """A document exactly MAX_NESTING levels deep parses (the job object is level 1)."""
    inner = json.loads("[" * (MAX_NESTING - 4) + "]" * (MAX_NESTING - 4))
    job = parse_job(make_job(runs=[{"parameters": {"x": inner}}], into=bytes))
    assert job.runs[0].parameters == {"x": inner}


# -- property tests: whatever the bytes, only JobRejected escapes ---------------------------

_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=20,
)
_KEYS = st.sampled_from(sorted(Job.model_fields) + ["runz", "", "\x00"])
_JOBLIKE = st.dictionaries(_KEYS, _JSON, max_size=6).map(lambda d: {"deployment": "a/b", **d})


def _parse_or_reject(data: bytes) -> Job | None:
    try:
        return parse_job(data, file="fuzz.json", max_runs=1000)
    except JobRejected as exc:
        assert exc.file == "fuzz.json" and exc.reason
        json.dumps(exc.as_dict()).encode("utf-8")  # always writable as NAME.error.json
        return None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_only_ever_raise_job_rejected(data: bytes) -> None:
    """The parser, fed any bytes, returns a Job or raises JobRejected, never anything else."""
    _parse_or_reject(data)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_JSON)
def test_arbitrary_json_only_ever_raises_job_rejected(document: Any) -> None:
    """The parser, fed any JSON value, returns a Job or raises JobRejected, never anything else."""
    _parse_or_reject(json.dumps(document).encode())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_JOBLIKE)
def test_arbitrary_job_like_objects_only_ever_raise_job_rejected(document: dict[str, Any]) -> None:
    """Objects made of the real keys with arbitrary values reach deep into validation, and still only JobRejected escapes."""
    job = _parse_or_reject(json.dumps(document).encode())
    if job is not None:
        assert 1 <= job.total_runs <= 1000


# -- file names ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "safe", "printable"),
    [
        ("my job.json", "my_job.json", "my job.json"),
        ("café ☕.json", "caf_.json", "café ☕.json"),
        ("-rf.json", "rf.json", "-rf.json"),
        ("--.json", "json", "--.json"),
        ("two\nlines.json", "two_lines.json", "two\nlines.json"),
        (os.fsdecode(b"bad\xffbyte.json"), "bad_byte.json", "bad\\xffbyte.json"),
        ("../../etc.json", "_.._etc.json", "../../etc.json"),
    ],
)
def test_file_names_become_safe_names_and_printable_text(
    name: str, safe: str, printable: str
) -> None:
    """A file name with spaces, unicode, a leading dash, a newline or non-UTF-8 bytes gets a safe rejected/ name and printable text."""
    assert (safe_name(name), printable_name(name)) == (safe, printable)
    printable_name(name).encode("utf-8")


# -- the queue's read: what it refuses without reading --------------------------------------


@pytest.fixture
def queue(tmp_path: Path) -> Queue:
    """A fresh queue directory."""
    q = Queue(tmp_path / "queue")
    q.ensure()
    return q


def _read_error(queue: Queue, name: str, max_bytes: int = 1024) -> str:
    with pytest.raises(JobRejected) as info:
        queue.read(name, max_bytes)
    assert info.value.file == name
    return info.value.reason


def test_a_symlink_is_refused_without_being_followed(queue: Queue, tmp_path: Path) -> None:
    """A symlink to a secret file outside the queue is refused by O_NOFOLLOW, its target never read."""
    (tmp_path / "secret").write_text('{"deployment": "a/b", "runs": [{}]}')
    (queue.incoming / "link.json").symlink_to(tmp_path / "secret")
    assert _read_error(queue, "link.json") == "a symbolic link; only regular files are accepted"


def test_a_fifo_is_refused_without_blocking(queue: Queue) -> None:
    """A FIFO with no writer is opened non-blocking and refused as not a regular file."""
    os.mkfifo(queue.incoming / "pipe.json")
    assert _read_error(queue, "pipe.json") == (
        "not a regular file (a FIFO, device or directory); only regular files are accepted"
    )


def test_a_directory_is_refused(queue: Queue) -> None:
    """A directory named like a job is refused as not a regular file."""
    (queue.incoming / "dir.json").mkdir()
    assert _read_error(queue, "dir.json") == (
        "not a regular file (a FIFO, device or directory); only regular files are accepted"
    )


def test_a_socket_is_refused(queue: Queue) -> None:
    """A Unix socket named like a job is refused (open gives ENXIO)."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(queue.incoming / "s.json"))
        assert _read_error(queue, "s.json") == "not a regular file; only regular files are accepted"


def test_a_hard_link_to_a_file_outside_the_queue_is_refused(queue: Queue, tmp_path: Path) -> None:
    """A second name for a file elsewhere is refused, so nobody gets a file judged through the queue."""
    (tmp_path / "outside.json").write_text('{"deployment": "a/b", "runs": [{}]}')
    os.link(tmp_path / "outside.json", queue.incoming / "linked.json")
    assert _read_error(queue, "linked.json") == (
        "the file has other hard links; only files with one name are accepted"
    )


def test_an_oversize_file_is_refused_from_its_size_without_reading_it(queue: Queue) -> None:
    """A 64 GiB sparse file is refused from fstat alone (reading it would take minutes and all memory)."""
    with open(queue.incoming / "huge.json", "wb") as fh:
        fh.truncate(64 * 1024**3)
    assert _read_error(queue, "huge.json", max_bytes=1024 * 1024) == (
        "the file is 68719476736 bytes, more than max_job_bytes (1048576)"
    )


def test_a_file_that_vanished_is_a_lost_claim_not_a_rejection(queue: Queue) -> None:
    """A file another daemon took between listing and reading raises ClaimLost (not JobRejected)."""
    with pytest.raises(ClaimLost):
        queue.read("gone.json", 1024)


def test_rejecting_a_file_that_vanished_leaves_nothing_behind(queue: Queue) -> None:
    """When the file is gone before the rejection's rename, its NAME.error.json is removed again."""
    with pytest.raises(FileNotFoundError):
        queue.reject("gone.json", JobRejected("the file is empty", file="gone.json"))
    assert sorted(p.name for p in queue.rejected.iterdir()) == []


def test_a_rejected_file_keeps_its_bytes_under_a_safe_name(queue: Queue) -> None:
    """rejected/ gets the original bytes under the safe name, and NAME.error.json beside it."""
    name = "-my job\n.json"
    (queue.incoming / name).write_bytes(b"\xff\xfe not json")
    error = JobRejected("the file is UTF-16", file=printable_name(name), hint="save it as UTF-8")
    target = queue.reject(name, error)
    assert target.name == "my_job_.json"
    assert target.read_bytes() == b"\xff\xfe not json"
    assert json.loads((queue.rejected / "my_job_.json.error.json").read_text()) == {
        "file": "-my job\n.json",
        "reason": "the file is UTF-16",
        "field": None,
        "hint": "save it as UTF-8",
    }


# -- secrets in parameter errors ------------------------------------------------------------


def test_a_refused_secret_parameter_is_named_but_its_value_never_shown() -> None:
    """Prefect's schema message echoes the value; for a secret-like parameter only the rule is shown."""
    deployment = Deployment(
        id="d",
        name="vault/vault",
        parameter_schema={
            "type": "object",
            "properties": {"api_key": {"type": "string"}, "table": {"type": "integer"}},
        },
    )
    assert parameter_problem(deployment, {"api_key": ["hunter2"]}) == (
        "the deployment's parameter schema rejects it: the value does not fit the rule "
        "anyOf=[{'type': 'string'}, {'type': 'null'}] (not shown: it looks like a secret)",
        "api_key",
    )
    assert parameter_problem(deployment, {"table": "seven"}) == (
        "the deployment's parameter schema rejects it: 'seven' is not valid under any of the given schemas",
        "table",
    )


#: A flow's parameter schema as Prefect writes it for ``def f(table: int, target: Target)``,
#: ``Target`` a pydantic model: a reference into ``definitions``, a nested field.
_MODEL_SCHEMA = {
    "title": "Parameters",
    "type": "object",
    "properties": {
        "table": {"title": "table", "type": "integer", "position": 0},
        "target": {"$ref": "#/definitions/Target", "position": 1},
    },
    "required": ["table", "target"],
    "definitions": {
        "Target": {
            "title": "Target",
            "type": "object",
            "properties": {"db": {"title": "db", "type": "string"}, "rows": {"type": "integer"}},
            "required": ["db"],
        }
    },
}


def _prefects_own_best_error(parameters: dict[str, Any]) -> tuple[str, str | None]:
    """What Prefect's ``validate`` of this one run finds, chosen by ``best_match``."""
    from jsonschema.exceptions import best_match
    from prefect.utilities.schema_tools.validation import validate

    cause = best_match(validate(parameters, _MODEL_SCHEMA))
    assert cause is not None
    return cause.message, ".".join(str(p) for p in cause.absolute_path) or None


def test_all_runs_are_checked_in_one_validation_that_names_the_first_bad_one() -> None:
    """A job's runs are validated together, and the problem is the first run's, in their
    order, with the message and parameter Prefect's own check of that run alone gives."""
    deployment = Deployment(id="d", name="etl/etl", parameter_schema=_MODEL_SCHEMA)
    good = {"table": 1, "target": {"db": "main", "rows": 2}}
    nested = {"table": 1, "target": {"db": "main", "rows": "many"}}
    missing = {"table": 1, "target": {"rows": 2}}
    unknown = {"table": 1, "target": {"db": "x"}, "tabel": 2}
    runs = [good, good, good, nested, good, unknown, missing]
    position, reason, field = first_parameter_problem(deployment, runs) or (None, "", None)
    message, path = _prefects_own_best_error(nested)
    assert (position, reason, field) == (
        3,
        f"the deployment's parameter schema rejects it: {message}",
        path,
    )
    assert field == "target.rows"
    assert first_parameter_problem(deployment, [good, unknown, nested]) == (
        1,
        "the flow takes no parameter 'tabel' (it takes: table, target)",
        "tabel",
    )
    assert first_parameter_problem(deployment, [good, missing])[:2] == (  # type: ignore[index]
        1,
        f"the deployment's parameter schema rejects it: {_prefects_own_best_error(missing)[0]}",
    )
    assert first_parameter_problem(deployment, [good] * 50) is None
    assert parameter_problem(deployment, nested) == (
        f"the deployment's parameter schema rejects it: {message}",
        "target.rows",
    )


def test_a_problem_inside_an_any_of_branch_names_its_parameter_by_its_whole_path() -> None:
    """When the best error lies in one branch of an ``anyOf`` (an Optional model), the field
    named is the parameter's path from the top (``x.a``), not the path inside the branch."""
    deployment = Deployment(
        id="d",
        name="etl/etl",
        parameter_schema={
            "type": "object",
            "properties": {
                "x": {
                    "anyOf": [
                        {"type": "object", "properties": {"a": {"type": "integer"}}},
                        {"type": "null"},
                    ]
                }
            },
        },
    )
    assert parameter_problem(deployment, {"x": {"a": "s"}}) == (
        "the deployment's parameter schema rejects it: 's' is not of type 'integer'",
        "x.a",
    )


def test_a_file_another_daemon_took_is_neither_an_error_nor_a_rejection(
    tmp_path: Path,
) -> None:
    """A file gone before its read or before its rejection's move leaves no error file and no count."""
    settings = Settings(queue=tmp_path / "queue", settle_s=0)
    queue = Queue(tmp_path / "queue")
    queue.ensure()
    rejections: list[JobRejected] = []
    intake = Intake(
        queue,
        settings,
        settings.policy(),
        CallbackHost(
            has_capacity=lambda _: True,
            start=lambda *_: pytest.fail("nothing is claimed"),
            rejected=lambda error, _: rejections.append(error),
            stop_recovered=lambda *_: pytest.fail("nothing is adopted"),
        ),
    )
    (queue.incoming / "bad.json").write_bytes(b"{")
    (candidate,) = queue.scan()
    verdict = intake._read_and_judge(candidate)
    assert verdict is not None and verdict.error is not None  # bad: to be rejected
    os.rename(queue.incoming / "bad.json", tmp_path / "taken.json")
    intake._reject(verdict)
    assert intake._read_and_judge(Candidate("gone.json", 1, 0, 0)) is None
    assert (rejections, os.listdir(queue.rejected)) == ([], [])
    intake.close()
