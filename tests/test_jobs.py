"""The job model: parsing, defaults, matrix and stage expansion (pure logic, no server)."""

from __future__ import annotations

import pytest

from flowsubmit.engine.runset import idempotency_key
from flowsubmit.errors import JobRejected
from flowsubmit.jobs.model import RunSpec, parse_job
from tests.support.jobs import make_job


def test_runs_then_matrix_with_defaults_merged_under_every_run() -> None:
    """`parameters` are merged under each run; `runs` come first, then the matrix product in order."""
    job = parse_job(
        make_job(
            parameters={"mode": "full", "table": 0},
            runs=[{"parameters": {"table": 1}, "tags": ["critical"]}],
            matrix={"table": [2, 3], "region": ["eu"]},
            tags=["nightly"],
            into=bytes,
        )
    )
    specs = job.resolved_stages()[0].expand(0)
    assert specs == [
        RunSpec(
            stage=0, index=0, parameters={"mode": "full", "table": 1}, tags=("nightly", "critical")
        ),
        RunSpec(
            stage=0,
            index=1,
            parameters={"mode": "full", "table": 2, "region": "eu"},
            tags=("nightly",),
        ),
        RunSpec(
            stage=0,
            index=2,
            parameters={"mode": "full", "table": 3, "region": "eu"},
            tags=("nightly",),
        ),
    ]
    assert job.total_runs == 3


def test_stages_inherit_the_job_defaults() -> None:
    """Each stage takes the job's deployment, parameters and tags unless it names its own."""
    job = parse_job(
        make_job(
            parameters={"mode": "full"},
            tags=["t"],
            stages=[
                {"runs": [{}]},
                {
                    "deployment": "load/load-deployment",
                    "parameters": {"mode": "append"},
                    "matrix": {"x": [1, 2]},
                },
            ],
            runs=None,
            into=bytes,
        )
    )
    first, second = job.resolved_stages()
    assert (first.deployment, first.parameters, first.tags) == (
        "etl/etl-deployment",
        {"mode": "full"},
        ["t"],
    )
    assert (second.deployment, second.parameters) == ("load/load-deployment", {"mode": "append"})
    assert [s.parameters for s in second.expand(1)] == [
        {"mode": "append", "x": 1},
        {"mode": "append", "x": 2},
    ]
    assert job.total_runs == 3


def test_matrix_explosion_is_refused_before_expanding() -> None:
    """A matrix whose product exceeds the limit is rejected by counting, not by building it."""
    huge = {f"k{i}": list(range(10)) for i in range(12)}  # 10**12 runs
    with pytest.raises(JobRejected) as info:
        parse_job(make_job(matrix=huge, runs=None, into=bytes), file="big.json", max_runs=10_000)
    assert info.value.as_dict() == {
        "file": "big.json",
        "field": "matrix",
        "reason": "the job expands to 1000000000000 runs, more than the limit of 10000",
        "hint": "split it into several jobs or raise max_runs_per_job",
    }


@pytest.mark.parametrize(
    ("data", "field", "reason"),
    [
        (b'{"deployment": ', None, "not valid JSON: Expecting value at line 1 column 16"),
        (make_job(runz=[{}], runs=None, into=bytes), "runz", "unknown key"),
        (b'{"runs": [{}]}', "deployment", "is missing: a job names the deployment to run"),
        (make_job(runs=None, into=bytes), "runs", "the job has no runs: give `runs` or `matrix`"),
        (make_job(runs=[{}], retries=-1, into=bytes), "retries", "must be at least 0, not -1"),
        (b"[1, 2]", None, "a job must be a JSON object, not a JSON array"),
    ],
)
def test_rejections_name_the_field_and_the_problem(
    data: bytes, field: str | None, reason: str
) -> None:
    """Each malformed job raises JobRejected naming the file, the field and what was wrong."""
    with pytest.raises(JobRejected) as info:
        parse_job(data, file="job.json")
    assert (info.value.file, info.value.field, info.value.reason) == ("job.json", field, reason)


def test_idempotency_key_carries_deployment_job_stage_index_and_attempt() -> None:
    """The key differs per deployment (Prefect scopes keys per flow) and per attempt."""
    assert idempotency_key("dep-1", "job-a", 0, 3, 0) == "flowsubmit/dep-1/job-a/0/3/0"
    keys = {idempotency_key(d, "j", 0, 0, a) for d in ("d1", "d2") for a in (0, 1)}
    assert len(keys) == 4
