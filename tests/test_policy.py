"""The policy as pure logic: which producer may ask for which deployments, job variables and tags (no server)."""

from __future__ import annotations

import grp
import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from flowsubmit.cli import main as cli
from flowsubmit.errors import JobRejected
from flowsubmit.jobs.model import Job
from flowsubmit.jobs.policy import (
    Policy,
    Producer,
    ProducerRule,
    current_producer,
    producer_of,
    reserved_tag_problems,
)
from flowsubmit.settings import Settings
from tests.support.jobs import make_job

#: The deployment the jobs here name unless a test says otherwise.
NIGHTLY = "etl/nightly"
ETL_CRON = Producer(1001, "etl-cron", 1001)
ALICE = Producer(1002, "alice", 1002)


def _refusal(policy: Policy, job: Job, producer: Producer = ETL_CRON) -> str:
    with pytest.raises(JobRejected) as caught:
        policy.check(job, producer)
    return caught.value.message


def _rules(*rules: dict[str, Any]) -> tuple[ProducerRule, ...]:
    return tuple(ProducerRule.model_validate(rule) for rule in rules)


def test_default_policy_allows_any_deployment_and_warns() -> None:
    """The default lets any deployment through, and says so (the start-up warning's condition)."""
    policy = Policy()
    policy.check(make_job(deployment="billing/export", into=Job), ETL_CRON)
    assert policy.launches_anything
    assert not Policy(allowed_deployments=("etl/*",)).launches_anything


def test_default_policy_refuses_any_job_variable_naming_key_and_setting() -> None:
    """By default a job setting any job variable is refused, naming the key and the setting."""
    message = _refusal(
        Policy(), make_job(deployment=NIGHTLY, job_variables={"image": "evil:latest"}, into=Job)
    )
    assert message == (
        "field 'job_variables.image': \"image\" is not allowed (allowed_job_variables: none)"
    )
    Policy(allowed_job_variables=("image",)).check(
        make_job(deployment=NIGHTLY, job_variables={"image": "x"}, into=Job), ETL_CRON
    )


def test_deployment_outside_the_global_patterns_is_refused() -> None:
    """A deployment no global pattern matches is refused with the patterns in the hint."""
    policy = Policy(allowed_deployments=("etl/*", "ops/backup"))
    policy.check(make_job(deployment="ops/backup", into=Job), ETL_CRON)
    message = _refusal(policy, make_job(deployment="billing/export", into=Job))
    assert message == (
        "field 'deployment': \"billing/export\" is not allowed "
        "(allowed_deployments: etl/*, ops/backup)"
    )


def test_a_producer_rule_narrows_its_user_only() -> None:
    """A [[producers]] rule for etl-cron narrows etl-cron, with the exact message docs/jobs.md shows; alice keeps the global policy."""
    policy = Policy(producers=_rules({"user": "etl-cron", "allowed_deployments": ["etl/*"]}))
    job = make_job(deployment="billing/export", into=Job)
    assert _refusal(policy, job) == (
        "field 'deployment': \"billing/export\" is not allowed for user etl-cron "
        "(allowed_deployments: etl/*)"
    )
    policy.check(job, ALICE)
    policy.check(make_job(deployment="etl/nightly", into=Job), ETL_CRON)


def test_a_rule_never_widens_the_global_policy() -> None:
    """A rule that lists more than the global settings allow still gets only what the global settings allow."""
    policy = Policy(
        allowed_deployments=("etl/*",),
        producers=_rules(
            {"uid": 1001, "allowed_deployments": ["*"], "allowed_job_variables": ["image"]}
        ),
    )
    assert _refusal(policy, make_job(deployment="billing/export", into=Job)).endswith(
        "is not allowed (allowed_deployments: etl/*)"
    )
    assert _refusal(
        policy, make_job(deployment=NIGHTLY, job_variables={"image": "x"}, into=Job)
    ).endswith("(allowed_job_variables: none)")


def test_every_matching_rule_applies() -> None:
    """A uid rule and a group rule that both match a producer both narrow it; the refusal names the rule."""
    group = grp.getgrgid(os.getgid()).gr_name
    me = Producer(4242, "someone", os.getgid())
    policy = Policy(
        allowed_job_variables=("image", "env"),
        producers=_rules(
            {"uid": 4242, "allowed_job_variables": ["image", "env"]},
            {"group": group, "allowed_job_variables": ["env"]},
        ),
    )
    policy.check(make_job(deployment=NIGHTLY, job_variables={"env": {}}, into=Job), me)
    assert _refusal(
        policy, make_job(deployment=NIGHTLY, job_variables={"image": "x"}, into=Job), me
    ) == (
        f"field 'job_variables.image': \"image\" is not allowed for group {group} "
        "(allowed_job_variables: env)"
    )
    policy.check(
        make_job(deployment=NIGHTLY, job_variables={"image": "x"}, into=Job),
        Producer(4243, None, None),
    )


def test_every_stage_is_checked_as_it_will_run() -> None:
    """Each stage's own deployment and job variables are checked under its field; a job-level deployment all stages override is never run."""
    policy = Policy(allowed_deployments=("etl/*",), allowed_job_variables=("env",))
    stages = [{"runs": [{}]}, {"deployment": "billing/export", "runs": [{}]}]
    assert _refusal(
        policy, make_job(deployment=NIGHTLY, runs=[], stages=stages, into=Job)
    ).startswith("field 'stages.1.deployment': \"billing/export\" is not allowed")
    inherit = [{"runs": [{}]}, {"runs": [{}], "job_variables": {"image": "x"}}]
    assert _refusal(
        policy, make_job(deployment=NIGHTLY, runs=[], stages=inherit, into=Job)
    ).startswith("field 'stages.1.job_variables.image': \"image\" is not allowed")
    overridden = [{"deployment": "etl/a", "runs": [{}]}]
    policy.check(
        make_job(deployment="billing/export", runs=[], stages=overridden, into=Job), ETL_CRON
    )
    inherited = [{"runs": [{}]}]
    assert _refusal(
        policy, make_job(deployment="billing/export", runs=[], stages=inherited, into=Job)
    ).startswith("field 'deployment':")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tags": ["nightly", "flowsubmit-producer:root"]}, "tags.1"),
        ({"runs": [{}, {"tags": ["flowsubmit-job:other"]}]}, "runs.1.tags.0"),
        ({"runs": [], "stages": [{"tags": ["flowsubmit-x"], "runs": [{}]}]}, "stages.0.tags.0"),
        (
            {"runs": [], "stages": [{"runs": [{"tags": ["flowsubmit-"]}]}]},
            "stages.0.runs.0.tags.0",
        ),
    ],
)
def test_reserved_tags_are_refused_wherever_they_are_set(
    fields: dict[str, Any], field: str
) -> None:
    """A ``flowsubmit-*`` tag is refused at job, run, stage and stage-run level, even by a permissive policy."""
    job = make_job(deployment=NIGHTLY, **fields, into=Job)
    (problem,) = reserved_tag_problems(job)
    assert problem.field == field
    assert problem.hint == "tags starting with 'flowsubmit-' are set by flowsubmit itself"
    assert _refusal(Policy(), job).startswith(f"field {field!r}: ")
    assert (
        reserved_tag_problems(
            make_job(deployment=NIGHTLY, tags=["flowsubmit", "my-flowsubmit-tag"], into=Job)
        )
        == []
    )


def test_problems_lists_every_refusal_in_order() -> None:
    """``problems`` lists every refusal (reserved tags, deployments, job variables; global before rules), for validate."""
    policy = Policy(
        allowed_deployments=("etl/*",),
        producers=_rules({"user": "etl-cron", "allowed_deployments": ["etl/nightly"]}),
    )
    job = make_job(
        deployment="etl/other",
        tags=["flowsubmit-x"],
        job_variables={"image": "x", "env": {}},
        into=Job,
    )
    assert [p.field for p in policy.problems(job, ETL_CRON)] == [
        "tags.0",
        "deployment",
        "job_variables.image",
        "job_variables.env",
    ]
    assert policy.problems(make_job(deployment=NIGHTLY, into=Job), ALICE) == []


def test_producer_of_a_file_is_its_owner(tmp_path: Path) -> None:
    """The producer is the file's owner, named where the uid resolves; an unknown uid is its number, also in the tag."""
    path = tmp_path / "job.json"
    path.write_text("{}")
    mine = producer_of(path.stat())
    assert mine == current_producer()
    assert mine.uid == os.geteuid() and mine.user is not None
    assert mine.as_dict() == {"uid": os.geteuid(), "user": mine.user}
    assert mine.tag == f"flowsubmit-producer:{mine.user}"
    stranger = Producer(54321)
    assert (stranger.name, stranger.tag) == ("54321", "flowsubmit-producer:54321")
    assert stranger.as_dict() == {"uid": 54321, "user": None}


def test_a_rule_names_exactly_one_producer() -> None:
    """A [[producers]] rule with no matcher, or two, is a settings error."""
    with pytest.raises(ValidationError, match="exactly one of user, uid or group"):
        ProducerRule.model_validate({"allowed_deployments": ["etl/*"]})
    with pytest.raises(ValidationError, match=r"\(this one gives user, uid\)"):
        ProducerRule.model_validate({"user": "a", "uid": 1})


def test_policy_settings_come_from_toml_env_and_flags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Lists come from TOML ([[producers]] tables), from JSON in FLOWSUBMIT_*, and from flags, each winning over the one before."""
    config = tmp_path / "flowsubmit.toml"
    config.write_text(
        'allowed_deployments = ["etl/*"]\n'
        'allowed_job_variables = ["env"]\n'
        "[[producers]]\n"
        'user = "etl-cron"\n'
        'allowed_deployments = ["etl/nightly"]\n'
    )
    policy = Settings.load(config).policy()
    assert policy == Policy(
        ("etl/*",), ("env",), _rules({"user": "etl-cron", "allowed_deployments": ["etl/nightly"]})
    )
    monkeypatch.setenv("FLOWSUBMIT_ALLOWED_DEPLOYMENTS", '["ops/*"]')
    monkeypatch.setenv("FLOWSUBMIT_PRODUCERS", '[{"group": "etl"}]')
    from_env = Settings.load(config).policy()
    assert from_env == Policy(("ops/*",), ("env",), _rules({"group": "etl"}))
    flags = Settings.load(config, allowed_job_variables=["image", "env"])
    assert flags.policy().allowed_job_variables == ("image", "env")


def test_validate_and_enqueue_check_the_policy_for_the_user_running_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``validate`` always refuses reserved tags, ``validate --policy`` and ``enqueue --config`` the whole policy for the current user, and nothing is dropped."""
    me = current_producer().name
    job = tmp_path / "export.json"
    job.write_text(
        json.dumps({"deployment": "billing/export", "runs": [{}], "tags": ["flowsubmit-x"]})
    )
    config = tmp_path / "flowsubmit.toml"
    config.write_text(
        f'allowed_deployments = ["*"]\n[[producers]]\nuser = "{me}"\nallowed_deployments = ["etl/*"]\n'
    )
    queue = tmp_path / "queue"

    assert cli(["validate", str(job)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"flowsubmit: {job}: field 'tags.0': \"flowsubmit-x\" is a reserved tag "
        "(tags starting with 'flowsubmit-' are set by flowsubmit itself)"
    ]
    assert cli(["validate", "--policy", "--config", str(config), str(job)]) == 2
    assert capsys.readouterr().err.splitlines()[1] == (
        f"flowsubmit: {job}: field 'deployment': \"billing/export\" is not allowed for user {me} "
        "(allowed_deployments: etl/*)"
    )
    job.write_text(json.dumps({"deployment": "billing/export", "runs": [{}]}))
    enqueue = ["enqueue", "--queue", str(queue), "--create"]
    assert cli([*enqueue, "--config", str(config), str(job)]) == 2
    assert "is not allowed for user" in capsys.readouterr().err
    assert list((queue / "incoming").iterdir()) == []
    assert cli([*enqueue, str(job)]) == 0  # the daemon's settings unknown: it judges the rest
    assert len(list((queue / "incoming").iterdir())) == 1
