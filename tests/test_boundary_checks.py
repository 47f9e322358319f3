"""A hostile job file's pure-logic checks: cheap parsing, no server-side hydration, safe names and ids, look-alike tags, per-producer limits (no server)."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.settings import PREFECT_API_URL, temporary_settings

from flowsubmit._wording import show
from flowsubmit.cli import main as cli
from flowsubmit.errors import JobRejected, PermanentGatewayError
from flowsubmit.gateway.client import Gateway
from flowsubmit.jobs import model as jobs
from flowsubmit.jobs.model import (
    MAX_PROBLEMS,
    RESERVED_ID_SUFFIXES,
    Job,
    check_job,
    deployment_name_problem,
    parse_job,
)
from flowsubmit.jobs.policy import (
    Policy,
    Producer,
    ProducerLimits,
    ProducerRule,
    is_reserved_tag,
    normalised_tag,
    reserved_tag_problems,
)
from flowsubmit.settings import Settings

MIB = 1024 * 1024
ETL_CRON = Producer(1001, "etl-cron", 1001)
KNOWN_RUN_KEYS = "known keys: name, parameters, tags"
JOB_KEYS = (
    "create_work_queue, deployment, id, job_variables, matrix, max_concurrency, on_timeout, "
    "parameters, priority, retries, runs, stages, tags, timeout, work_queue_name"
)
NAME_RULE = "a flow or deployment name holds letters, digits, '_', '-', '.' and inner spaces"
KINDS_HINT = (
    "give the value itself; the daemon's setting allow_prefect_kinds lets Prefect fill it in"
)


def _bomb(head: str, item: str, tail: str, count: int) -> bytes:
    """``head`` + ``count`` items (``{i}`` numbered) joined by commas + ``tail``, at most 1 MiB."""
    data = (head + ",".join(item.format(i=i) for i in range(count)) + tail).encode()
    assert len(data) <= MIB
    return data


def _job(**fields: Any) -> Job:
    return Job.model_validate({"deployment": "etl/nightly", "runs": [{}], **fields})


def _messages(data: bytes) -> list[str]:
    return [problem.message for problem in check_job(data)[1]]


def _rules(*rules: dict[str, Any]) -> tuple[ProducerRule, ...]:
    return tuple(ProducerRule.model_validate(rule) for rule in rules)


# -- parsing cost ----------------------------------------------------------------------------


def test_a_key_bomb_reports_the_first_twenty_problems_and_counts_the_rest() -> None:
    """95,000 unknown top-level keys (under 1 MiB) give the first 20 in file order and one line counting the other 94,980."""
    data = _bomb('{"deployment":"a/b","runs":[{}],', '"k{i}":0', "}", 95_000)
    messages = _messages(data)
    assert len(messages) == MAX_PROBLEMS + 1
    assert messages[0] == f"field 'k0': unknown key (known keys: {JOB_KEYS})"
    assert [m.split("'")[1] for m in messages[:MAX_PROBLEMS]] == [f"k{i}" for i in range(20)]
    assert messages[-1] == (
        "and 94980 more problems, not listed "
        "(only the first 20 are; fix them and check the file again)"
    )
    with pytest.raises(JobRejected) as caught:
        parse_job(data, file="bomb.json")
    assert caught.value.message == f"bomb.json: field 'k0': unknown key (known keys: {JOB_KEYS})"


def test_only_the_problems_reported_get_a_suggestion(monkeypatch: pytest.MonkeyPatch) -> None:
    """A suggestion ("did you mean") is built for the 20 problems reported, not for the 5,000 others."""
    calls: list[str] = []
    real = jobs.did_you_mean
    monkeypatch.setattr(
        jobs, "did_you_mean", lambda name, known: calls.append(name) or real(name, known)
    )
    check_job(_bomb('{"deployment":"a/b","runs":[{}],', '"k{i}":0', "}", 5020))
    assert calls == [f"k{i}" for i in range(20)]


@pytest.mark.parametrize(
    ("data", "first", "rest"),
    [
        (
            _bomb('{"deployment":"a/b","runs":[{', '"k{i}":0', "}]}", 20_000),
            f"field 'runs.0.k0': unknown key ({KNOWN_RUN_KEYS})",
            19_980,
        ),
        (
            _bomb('{"deployment":"a/b","stages":[{"runs":[{}],', '"k{i}":0', "}]}", 20_000),
            "field 'stages.0.k0': unknown key",
            19_980,
        ),
        (
            _bomb('{"deployment":"a/b","runs":[', '{{"tags":1}}', "]}", 20_000),
            "field 'runs.0.tags': must be a list, not 1",
            19_980,
        ),
        (
            _bomb('{"deployment":"a/b","runs":[', '{{"name":1,"x{i}":2}}', "]}", 10_000),
            "field 'runs.0.name': must be a string, not 1",
            19_980,
        ),
        (
            _bomb('{"deployment":"a/b","matrix":{', '"k{i}":1', "}}", 20_000),
            "field 'matrix.k0': must be a list, not 1",
            19_980,
        ),
    ],
    ids=["runs-entry-keys", "stage-keys", "runs-bad-types", "runs-bad-types-and-keys", "matrix"],
)
def test_bombs_inside_runs_stages_and_matrix_are_capped(data: bytes, first: str, rest: int) -> None:
    """Problems inside runs, stages and the matrix are capped the same way, the first in file order."""
    messages = _messages(data)
    assert len(messages) == MAX_PROBLEMS + 1
    assert messages[0].startswith(first)
    assert messages[-1].startswith(f"and {rest} more problems, not listed")


def test_a_matrix_of_astronomical_size_is_counted_without_computing_it() -> None:
    """A matrix of 70,000 two-value lists (2**70000 runs) is refused by a count that stops at 10**18."""
    data = _bomb('{"deployment":"a/b","matrix":{', '"k{i}":[0,1]', "}}", 70_000)
    assert _messages(data) == [
        "field 'matrix': the job expands to more than 1000000000000000000 runs, more than the "
        "limit of 10000 (split it into several jobs or raise max_runs_per_job)"
    ]


def test_validate_lists_the_capped_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``flowsubmit validate`` prints the first 20 problems and the line counting the rest."""
    path = tmp_path / "bomb.json"
    path.write_bytes(_bomb('{"deployment":"a/b","runs":[{}],', '"k{i}":0', "}", 1000))
    assert cli(["validate", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 21
    assert lines[-1] == (
        f"flowsubmit: {path}: and 980 more problems, not listed "
        "(only the first 20 are; fix them and check the file again)"
    )


def test_an_unknown_key_still_hides_the_no_runs_problem() -> None:
    """A misspelt ``runs``, in the job or in a stage, is reported as the unknown key alone, as before the cap."""
    assert _messages(b'{"deployment": "a/b", "runz": [{}]}') == [
        "field 'runz': unknown key (did you mean 'runs'?)"
    ]
    assert _messages(b'{"deployment": "a/b", "stages": [{"runz": [{}]}]}') == [
        "field 'stages.0.runz': unknown key (did you mean 'runs'?)"
    ]


# -- server-side hydration -------------------------------------------------------------------

WORKSPACE_VARIABLE = {"__prefect_kind": "workspace_variable", "variable_name": "db_password"}


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"parameters": {"password": WORKSPACE_VARIABLE}}, "parameters.password.__prefect_kind"),
        (
            {
                "runs": [
                    {},
                    {"parameters": {"x": [1, {"__prefect_kind": "jinja", "template": "{{ 1 }}"}]}},
                ]
            },
            "runs.1.parameters.x.1.__prefect_kind",
        ),
        ({"matrix": {"db": ["a", WORKSPACE_VARIABLE]}, "runs": []}, "matrix.db.1.__prefect_kind"),
        (
            {
                "runs": [],
                "stages": [{"runs": [{}], "parameters": {"a": {"b": WORKSPACE_VARIABLE}}}],
            },
            "stages.0.parameters.a.b.__prefect_kind",
        ),
        (
            {"runs": [], "stages": [{"runs": [{"parameters": WORKSPACE_VARIABLE}]}]},
            "stages.0.runs.0.parameters.__prefect_kind",
        ),
    ],
    ids=["job", "run-list", "matrix", "stage", "stage-run"],
)
def test_prefect_kinds_are_refused_at_any_depth(fields: dict[str, Any], field: str) -> None:
    """A ``__prefect_kind`` key anywhere in parameters is refused by default, naming its path; the switch allows it."""
    job = _job(**fields)
    kind = "jinja" if "runs.1" in field else "workspace_variable"
    expected = (
        f"field {field!r}: asks Prefect to fill in a value on the server "
        f'(__prefect_kind: "{kind}"), which the daemon\'s policy does not allow ({KINDS_HINT})'
    )
    assert [p.message for p in Policy().problems(job, ETL_CRON)] == [expected]
    assert [p.message for p in reserved_tag_problems(job)] == [expected]
    assert Policy(allow_prefect_kinds=True).problems(job, ETL_CRON) == []
    assert reserved_tag_problems(job, allow_prefect_kinds=True) == []


def test_validate_refuses_prefect_kinds_without_policy_and_the_setting_allows_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``validate`` refuses a ``__prefect_kind`` with the default settings; ``--policy`` with allow_prefect_kinds accepts it."""
    job = tmp_path / "hydrate.json"
    job.write_text(
        json.dumps({"deployment": "a/b", "runs": [{"parameters": {"p": WORKSPACE_VARIABLE}}]})
    )
    assert cli(["validate", str(job)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"flowsubmit: {job}: field 'runs.0.parameters.p.__prefect_kind': asks Prefect to fill in a "
        f'value on the server (__prefect_kind: "workspace_variable"), which the daemon\'s policy '
        f"does not allow ({KINDS_HINT})"
    ]
    config = tmp_path / "flowsubmit.toml"
    config.write_text("allow_prefect_kinds = true\n")
    assert cli(["validate", "--policy", "--config", str(config), str(job)]) == 0
    assert Settings.load(config).policy().allow_prefect_kinds is True


def test_policy_problems_are_capped_like_parse_problems() -> None:
    """A job of 1,000 reserved tags and 1,000 ``__prefect_kind`` gets the first 20 refusals and one counting the rest."""
    job = _job(
        tags=[f"flowsubmit-{i}" for i in range(1000)],
        parameters={f"p{i}": WORKSPACE_VARIABLE for i in range(1000)},
    )
    for problems in (Policy().problems(job, ETL_CRON), reserved_tag_problems(job)):
        assert [p.field for p in problems[:MAX_PROBLEMS]] == [f"tags.{i}" for i in range(20)]
        assert problems[-1].message == (
            "and 1980 more problems, not listed "
            "(only the first 20 are; fix them and check the file again)"
        )
        assert len(problems) == MAX_PROBLEMS + 1


# -- names are names -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("deployment", "reason"),
    [
        ("secret/admin#-ro", 'the deployment name contains "#", which a name may not hold'),
        ("secret/admin?x=-ro", 'the deployment name contains "?", which a name may not hold'),
        ("secret%2Fadmin/x", 'the flow name contains "%", which a name may not hold'),
        ("a&b/c", 'the flow name contains "&", which a name may not hold'),
        ("a\\b/c", 'the flow name contains "\\\\", which a name may not hold'),
        ("etl/night\u200bly", 'the deployment name contains "\\u200b", which a name may not hold'),
        ("etl/night\tly", 'the deployment name contains "\\t", which a name may not hold'),
        (" etl/nightly", "the flow name starts with a space"),
        ("etl/nightly ", "the deployment name ends with a space"),
    ],
)
def test_deployment_names_are_limited_to_a_safe_character_set(deployment: str, reason: str) -> None:
    """A name holding URL syntax, a control or format character, or an outer space is refused naming the character."""
    data = json.dumps({"deployment": deployment, "runs": [{}]}).encode()
    assert _messages(data) == [f"field 'deployment': {reason} ({NAME_RULE})"]
    stages = json.dumps({"stages": [{"deployment": deployment, "runs": [{}]}]}).encode()
    assert _messages(stages) == [f"field 'stages.0.deployment': {reason} ({NAME_RULE})"]
    problem = deployment_name_problem(deployment)
    assert problem is not None and problem.message == f"field 'deployment': {reason} ({NAME_RULE})"


def test_names_of_letters_digits_and_inner_spaces_are_accepted() -> None:
    """Letters of any script, digits, '_', '-', '.' and inner spaces make a valid name."""
    for name in ("etl_v2/nightly-1.0", "café/déploiement du soir", "数据/每日", "ETL 2/x"):
        assert parse_job(json.dumps({"deployment": name, "runs": [{}]}).encode()).deployment == name
        assert deployment_name_problem(name) is None
    assert deployment_name_problem("etl").message == (  # type: ignore[union-attr]
        "field 'deployment': must be a flow name and a deployment name joined by one '/', not "
        '"etl" (`flow-name/deployment-name`; `prefect deployment ls` lists the deployments)'
    )


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[str]]]:
    """A local HTTP server answering 404 to everything, and the raw request paths it saw."""
    paths: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            paths.append(self.path)
            body = b'{"detail": "Deployment not found"}'
            self.send_response(404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/api", paths
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_the_gateway_quotes_names_in_the_request_path(
    recorder: tuple[str, list[str]],
) -> None:
    """``resolve_deployment`` sends each name percent-quoted, so '#' and '?' stay in the name."""
    url, paths = recorder
    with temporary_settings(updates={PREFECT_API_URL: url}):
        async with Gateway(outage_tolerance_s=1.0) as gateway:
            with pytest.raises(PermanentGatewayError):
                await gateway.resolve_deployment("secret/admin#-ro")
            with pytest.raises(PermanentGatewayError):
                await gateway.resolve_deployment("a b/c?d&e%f")
    assert paths == [
        "/api/deployments/name/secret/admin%23-ro",
        "/api/deployments/name/a%20b/c%3Fd%26e%25f",
    ]


# -- ids -------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", RESERVED_ID_SUFFIXES)
def test_an_id_ending_in_a_queue_suffix_is_refused(suffix: str) -> None:
    """An id ending in one of the queue's own suffixes, in any case, is refused naming it."""
    written = f"rep{suffix.upper()}"
    data = json.dumps({"id": written, "deployment": "a/b", "runs": [{}]}).encode()
    assert _messages(data) == [
        f"field 'id': the job id ends in \"{suffix.upper()}\", a suffix the queue gives its own "
        "files (an id may not end in .result, .journal, .lock, .cancel, .error, .json, .tmp, "
        ".part (in any case))"
    ]
    assert parse_job(
        json.dumps({"id": f"rep{suffix}x", "deployment": "a/b", "runs": [{}]}).encode()
    )


def test_an_id_may_not_hold_an_at_sign() -> None:
    """``@`` stays out of ids: ``ID@user`` names a producer's own queue."""
    data = json.dumps({"id": "nightly@alice", "deployment": "a/b", "runs": [{}]}).encode()
    assert _messages(data)[0].startswith("field 'id': the job id contains \"@\"")


# -- look-alike reserved tags ----------------------------------------------------------------


@pytest.mark.parametrize(
    "tag",
    [
        "Flowsubmit-producer:x",
        "flowsubmit\u2010producer:x",
        "flow\u200bsubmit-producer:x",
        " flowsubmit-producer:x",
        "\uff46\uff4c\uff4f\uff57\uff53\uff55\uff42\uff4d\uff49\uff54-producer:x",
        "FLOWSUBMIT\u2014job:x",
        "flowsubmit -producer:x",
    ],
    ids=[
        "case",
        "u2010-hyphen",
        "zero-width-space",
        "leading-space",
        "fullwidth",
        "em-dash",
        "inner-space",
    ],
)
def test_look_alike_reserved_tags_are_refused(tag: str) -> None:
    """A tag that reads as ``flowsubmit-*`` once normalised is refused like the real prefix."""
    assert is_reserved_tag(tag)
    assert normalised_tag(tag).startswith("flowsubmit-")
    (problem,) = reserved_tag_problems(_job(tags=[tag]))
    assert (problem.field, problem.hint) == (
        "tags.0",
        "tags starting with 'flowsubmit-' are set by flowsubmit itself, and this one reads as one",
    )
    assert problem.reason == f"{show(tag)} is a reserved tag"
    assert not is_reserved_tag("flowsubmitter") and not is_reserved_tag("my-flowsubmit-tag")


# -- per-producer limits ---------------------------------------------------------------------


def test_limits_for_takes_the_smallest_of_the_global_setting_and_every_matching_rule() -> None:
    """Each maximum is the smallest given; the default timeout is the smallest and never above the maximum."""
    policy = Policy(
        limits=ProducerLimits(max_running_jobs=4, max_priority=50, max_timeout_s=7200),
        producers=_rules(
            {
                "user": "etl-cron",
                "max_running_jobs": 2,
                "max_runs_in_flight": 300,
                "default_timeout_s": 9000,
            },
            {"uid": 1001, "max_runs_in_flight": 100, "max_priority": 60},
            {"user": "alice", "max_running_jobs": 1},
        ),
    )
    assert policy.limits_for(ETL_CRON) == ProducerLimits(
        max_running_jobs=2,
        max_runs_in_flight=100,
        max_priority=50,
        max_timeout_s=7200,
        default_timeout_s=7200,
    )
    assert policy.limits_for(Producer(2000, "bob", 2000)) == ProducerLimits(
        max_running_jobs=4, max_priority=50, max_timeout_s=7200
    )
    assert policy.limits_for(ETL_CRON).job_timeout_s == 7200
    assert Policy().limits_for(ETL_CRON) == ProducerLimits()


def test_priority_and_timeout_above_the_limits_are_refused_naming_the_rule() -> None:
    """A priority or timeout above a limit is refused per limit it breaks, naming the setting; no timeout is not refused."""
    policy = Policy(
        limits=ProducerLimits(max_priority=50, max_timeout_s=7200),
        producers=_rules({"user": "etl-cron", "max_priority": 10, "max_timeout_s": 3600.5}),
    )
    job = _job(priority=60, timeout=9000)
    assert [p.message for p in policy.problems(job, ETL_CRON)] == [
        "field 'priority': must be at most 50, not 60 (producer_max_priority: 50)",
        "field 'priority': must be at most 10 for user etl-cron, not 60 (max_priority: 10)",
        "field 'timeout': must be at most 7200, not 9000 (producer_max_timeout_s: 7200)",
        "field 'timeout': must be at most 3600.5 for user etl-cron, not 9000 (max_timeout_s: 3600.5)",
    ]
    assert policy.problems(_job(priority=10, timeout=3600), ETL_CRON) == []
    assert policy.problems(_job(priority=60), Producer(2000, "bob", 2000))[0].field == "priority"
    assert policy.problems(_job(), ETL_CRON) == []


def test_limits_come_from_the_settings_and_validate_policy_reports_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The producer_* settings and a rule's limits reach the policy, and ``validate --policy`` reports a breach."""
    config = tmp_path / "flowsubmit.toml"
    config.write_text(
        "producer_max_running_jobs = 3\nproducer_max_runs_in_flight = 400\n"
        "producer_max_priority = 20\nproducer_max_timeout_s = 600\nproducer_default_timeout_s = 60\n"
        "[[producers]]\nuid = 1001\nmax_running_jobs = 1\n"
    )
    policy = Settings.load(config).policy()
    assert policy.limits == ProducerLimits(3, 400, 20, 600, 60)
    assert policy.limits_for(ETL_CRON) == ProducerLimits(1, 400, 20, 600, 60)
    job = tmp_path / "urgent.json"
    job.write_text(json.dumps({"deployment": "a/b", "runs": [{}], "priority": 30, "timeout": 60}))
    assert cli(["validate", "--policy", "--config", str(config), str(job)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"flowsubmit: {job}: field 'priority': must be at most 20, not 30 (producer_max_priority: 20)"
    ]


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"user": "a", "max_priority": 101}, "less than or equal to 100"),
        ({"user": "a", "max_running_jobs": 0}, "greater than or equal to 1"),
        ({"user": "a", "max_timeout_s": 0}, "greater than 0"),
    ],
)
def test_rule_limits_are_checked(rule: dict[str, Any], message: str) -> None:
    """A rule's limits must be in range: a priority within the job range, counts at least 1, times above 0."""
    with pytest.raises(ValueError, match=message):
        ProducerRule.model_validate(rule)


@pytest.mark.parametrize(
    ("variables", "field", "found"),
    [
        ({"env": {"DB": "{{ prefect.variables.db_password }}"}}, "job_variables.env.DB", None),
        (
            {"env": {"X": {"$ref": {"block_document_id": "abc"}}}},
            "job_variables.env.X.$ref",
            "$ref",
        ),
        ({"args": ["--token", "{{ prefect.blocks.secret.api }}"]}, "job_variables.args.1", None),
    ],
    ids=["variable", "block-ref", "list"],
)
def test_job_variables_a_worker_would_fill_in_are_refused(
    variables: dict[str, Any], field: str, found: str | None
) -> None:
    """A template or a ``$ref`` block reference in job variables, which a worker resolves from the workspace, is refused unless allow_prefect_kinds."""
    job = _job(job_variables=variables)
    value = found or _first_text(variables)
    expected = (
        f"field {field!r}: asks Prefect to fill in a value on the worker ({show(value)}), "
        f"which the daemon's policy does not allow ({KINDS_HINT})"
    )
    allowed = Policy(allowed_job_variables=tuple(variables))
    assert [p.message for p in allowed.problems(job, ETL_CRON)] == [expected]
    assert [p.message for p in reserved_tag_problems(job)] == [expected]
    assert (
        Policy(allowed_job_variables=tuple(variables), allow_prefect_kinds=True).problems(
            job, ETL_CRON
        )
        == []
    )


def _first_text(value: Any) -> str:
    """The first string holding ``{{`` inside ``value``."""
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return next(t for item in value if (t := _first_text(item)))
    return value if isinstance(value, str) and "{{" in value else ""


def test_a_tag_is_at_most_200_characters_so_normalising_it_stays_cheap() -> None:
    """A tag of 64,000 combining marks (whose NFKC normalisation costs quadratic time) is refused by its length, before any normalisation."""
    tag = "\u0301" * 32_000 + "\u0316" * 32_000
    data = json.dumps({"deployment": "etl/nightly", "runs": [{"tags": [tag]}]}).encode()
    (problem,) = check_job(data)[1]
    assert (problem.field, problem.reason) == (
        "runs.0.tags.0",
        "is 64000 characters long, more than the limit of 200",
    )
