"""The policy through the daemon on the real server, with job files owned by two real non-root users."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

from tests.support.daemons import Daemon, result_of
from tests.support.driver import drive, wait_for_runs
from tests.support.flows import DRIVEN, ETL, VAULT

#: Two producers, created by the test when absent (the tests run as root).
#: Named after this process, so that two test workers never share (or remove) each other's users.
ETL_USER, OTHER_USER = f"fsp{os.getpid()}-etl", f"fsp{os.getpid()}-ana"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating users needs root")


def _user(name: str) -> pwd.struct_passwd:
    """The user ``name``, created (system account, no home, no shell) when absent."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        done = subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name],
            capture_output=True,
        )
        assert done.returncode in (0, 9), done.stderr  # 9: created meanwhile by another test
        return pwd.getpwnam(name)


@pytest.fixture(scope="module")
def users() -> Iterator[dict[str, pwd.struct_passwd]]:
    """The two producers of this module, by name; removed at its end."""
    yield {name: _user(name) for name in (ETL_USER, OTHER_USER)}
    for name in (ETL_USER, OTHER_USER):
        subprocess.run(["userdel", name], capture_output=True)


def _drop(queue: Path, name: str, job: dict[str, Any], owner: pwd.struct_passwd) -> None:
    """Create a job file owned by ``owner`` in tmp/, then rename it into incoming/ (as root).

    The rename is done by another user than the file's owner: the owner, its creator,
    stays the producer.
    """
    staged = queue / "tmp" / f"{name}.part"
    staged.write_text(json.dumps(job))
    os.chown(staged, owner.pw_uid, owner.pw_gid)
    staged.rename(queue / "incoming" / f"{name}.json")


def _errors(queue: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name.removesuffix(".json.error.json"): json.loads(p.read_text())
        for p in (queue / "rejected").glob("*.error.json")
    }


def _refused(file: str, field: str, reason: str, hint: str) -> dict[str, Any]:
    return {"file": f"{file}.json", "field": field, "reason": reason, "hint": hint}


async def _runs_tagged(tag: str) -> list[Any]:
    async with get_client() as client:
        return list(
            await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[tag]))
            )
        )


def _finish(daemon: Daemon, job_id: str, runs: int) -> tuple[str, dict[str, Any]]:
    """Drive the job's runs to Completed and return its (folder, result)."""
    run_ids = asyncio.run(wait_for_runs(f"flowsubmit-job:{job_id}", runs))
    asyncio.run(drive(run_ids))
    return daemon.wait_for(lambda: result_of(daemon.queue, job_id), what=f"result of {job_id}")  # type: ignore[no-any-return]


def test_default_policy_warns_refuses_job_variables_and_reserved_tags_and_records_the_producer(
    start_daemon: Callable[..., Daemon], users: dict[str, pwd.struct_passwd]
) -> None:
    """With the defaults the daemon warns at start-up, rejects any job variable and a reserved tag (no run), and records the producer in job.claimed, the result and a run tag on the server."""
    daemon = start_daemon(settle_s=0)
    etl = users[ETL_USER]
    (warning,) = daemon.events("service.any_deployment_allowed")
    assert (warning["level"], warning["allowed_deployments"]) == ("warning", ["*"])

    job = {"deployment": DRIVEN, "runs": [{}, {"tags": ["nightly"]}]}
    _drop(
        daemon.queue, "vars", {**job, "id": "pol-vars", "job_variables": {"env": {"A": "1"}}}, etl
    )
    _drop(daemon.queue, "tag", {**job, "id": "pol-tag", "tags": ["flowsubmit-producer:root"]}, etl)
    _drop(daemon.queue, "good", {**job, "id": "pol-good"}, etl)

    folder, result = _finish(daemon, f"pol-good@{ETL_USER}", 2)

    assert (folder, result["producer"]) == ("done", {"uid": etl.pw_uid, "user": ETL_USER})
    (claimed,) = daemon.events("job.claimed")
    assert claimed["producer"] == {"uid": etl.pw_uid, "user": ETL_USER}
    tagged = asyncio.run(_runs_tagged(f"flowsubmit-producer:{ETL_USER}"))
    assert sorted(str(r.id) for r in tagged) == sorted(r["flow_run_id"] for r in result["runs"])
    own = {"flowsubmit", f"flowsubmit-job:pol-good@{ETL_USER}", f"flowsubmit-producer:{ETL_USER}"}
    assert all(own <= set(run.tags) for run in tagged)
    daemon.wait_for(lambda: len(_errors(daemon.queue)) == 2, what="two rejections")
    assert _errors(daemon.queue) == {
        f"vars@{ETL_USER}": _refused(
            "vars",
            "job_variables.env",
            '"env" is not allowed',
            "allowed_job_variables: none",
        ),
        f"tag@{ETL_USER}": _refused(
            "tag",
            "tags.0",
            '"flowsubmit-producer:root" is a reserved tag',
            "tags starting with 'flowsubmit-' are set by flowsubmit itself",
        ),
    }
    assert {(e["level"], e["field"]) for e in daemon.events("job.rejected")} == {
        ("warning", "job_variables.env"),
        ("warning", "tags.0"),
    }
    for refused in ("pol-vars", "pol-tag"):
        assert asyncio.run(_runs_tagged(f"flowsubmit-job:{refused}@{ETL_USER}")) == []


def test_producer_rules_narrow_one_user_and_allowed_job_variables_pass(
    start_daemon: Callable[..., Daemon],
    tmp_path: Path,
    users: dict[str, pwd.struct_passwd],
) -> None:
    """A [[producers]] rule narrows etl's deployments (also in a later stage, and in a job recovered before any run) but not ana's; a deployment outside the global patterns is refused for both; an allowed job variable reaches the run."""
    etl, ana = users[ETL_USER], users[OTHER_USER]
    vault = {"deployment": VAULT, "runs": [{"parameters": {"table": 1}}]}
    # Claimed by a daemon that died before creating a run; this one adopts it under its policy.
    orphan = tmp_path / "queue" / "processing" / "pol-orphan.json"
    orphan.parent.mkdir(parents=True)
    orphan.write_text(json.dumps({**vault, "id": "pol-orphan"}))
    os.chown(orphan, etl.pw_uid, etl.pw_gid)
    daemon = start_daemon(
        settle_s=0,
        allowed_deployments=["driven/*", "vault/*"],
        allowed_job_variables=["env"],
        producers=[{"user": ETL_USER, "allowed_deployments": ["driven/*"]}],
    )
    assert daemon.events("service.any_deployment_allowed") == []
    _drop(daemon.queue, "etl-vault", {**vault, "id": "pol-etl-vault"}, etl)
    _drop(daemon.queue, "etl-etl", {"deployment": ETL, "runs": [{}]}, etl)
    staged = {"deployment": DRIVEN, "stages": [{"runs": [{}]}, {**vault}]}
    _drop(daemon.queue, "etl-stages", staged, etl)
    env = {"env": {"POLICY_TEST": "1"}}
    _drop(daemon.queue, "ana-vault", {**vault, "id": "pol-ana-vault", "job_variables": env}, ana)

    folder, result = _finish(daemon, f"pol-ana-vault@{OTHER_USER}", 1)

    assert (folder, result["producer"]) == ("done", {"uid": ana.pw_uid, "user": OTHER_USER})
    (run,) = asyncio.run(_runs_tagged(f"flowsubmit-producer:{OTHER_USER}"))
    assert run.job_variables == env
    daemon.wait_for(lambda: len(_errors(daemon.queue)) == 4, what="four rejections")
    not_for_etl = f"for user {ETL_USER}"
    assert _errors(daemon.queue) == {
        f"etl-vault@{ETL_USER}": _refused(
            "etl-vault",
            "deployment",
            f'"{VAULT}" is not allowed {not_for_etl}',
            "allowed_deployments: driven/*",
        ),
        f"etl-etl@{ETL_USER}": _refused(
            "etl-etl",
            "deployment",
            f'"{ETL}" is not allowed',
            "allowed_deployments: driven/*, vault/*",
        ),
        "pol-orphan": _refused(  # adopted from processing/: it keeps the name it had there
            "pol-orphan",
            "deployment",
            f'"{VAULT}" is not allowed {not_for_etl}',
            "allowed_deployments: driven/*",
        ),
        f"etl-stages@{ETL_USER}": _refused(
            "etl-stages",
            "stages.1.deployment",
            f'"{VAULT}" is not allowed {not_for_etl}',
            "allowed_deployments: driven/*",
        ),
    }
    for refused in (f"pol-etl-vault@{ETL_USER}", "pol-orphan"):
        assert asyncio.run(_runs_tagged(f"flowsubmit-job:{refused}")) == []


def test_per_producer_limits_keep_slots_and_runs_for_the_others(
    start_daemon: Callable[..., Daemon], users: dict[str, pwd.struct_passwd]
) -> None:
    """mallory's four never-ending priority-100 jobs take two of the four slots and three runs in flight; ana's job is claimed beside them and ends at her default timeout."""
    mallory, ana = users[ETL_USER], users[OTHER_USER]
    daemon = start_daemon(
        settle_s=0,
        max_concurrent_jobs=4,
        producer_max_running_jobs=2,
        producer_max_runs_in_flight=3,
        producer_default_timeout_s=3,
    )
    forever = {"deployment": DRIVEN, "runs": [{}, {}], "priority": 100, "timeout": 600}
    for i in range(4):
        _drop(daemon.queue, f"hog{i}", {**forever, "id": f"hog{i}"}, mallory)
    daemon.wait_for_event("job.claimed", count=2)
    _drop(daemon.queue, "ana", {"deployment": DRIVEN, "runs": [{}], "id": "quota"}, ana)

    folder, result = daemon.wait_for(
        lambda: result_of(daemon.queue, f"quota@{OTHER_USER}"), what="ana's job to time out"
    )

    assert (folder, result["status"]) == ("failed", "timed_out")
    claimed = [line["producer"]["user"] for line in daemon.events("job.claimed")]
    assert sorted(claimed) == sorted([ETL_USER, ETL_USER, OTHER_USER])
    created = [asyncio.run(_runs_tagged(f"flowsubmit-job:hog{i}@{ETL_USER}")) for i in range(4)]
    assert sum(map(len, created)) == 3  # two jobs of two runs, three in flight at most
    assert sorted(os.listdir(daemon.queue / "incoming")) == ["hog2.json", "hog3.json"]


def test_a_job_rewritten_after_its_claim_runs_as_judged_across_a_kill_9(
    start_daemon: Callable[..., Daemon], users: dict[str, pwd.struct_passwd]
) -> None:
    """mallory keeps her allowed two-stage job open, rewrites stage 1 to a forbidden deployment under ana's name after the claim, and the daemon is killed: the next daemon runs the stages it judged, nothing else."""
    mallory = users[ETL_USER]
    daemon = start_daemon(settle_s=0, allowed_deployments=["driven/*"])
    job = {"id": "rewrite", "deployment": DRIVEN, "stages": [{"runs": [{}]}, {"runs": [{}]}]}
    judged = json.dumps(job).encode()
    staged = daemon.queue / "tmp" / "rewrite.part"
    staged.write_bytes(judged)
    os.chown(staged, mallory.pw_uid, mallory.pw_gid)
    kept = os.open(staged, os.O_WRONLY)
    staged.rename(daemon.queue / "incoming" / "rewrite.json")
    name = f"rewrite@{ETL_USER}"
    (first,) = asyncio.run(wait_for_runs(f"flowsubmit-job:{name}", 1))
    evil = {"deployment": VAULT, "job_variables": {"image": "evil"}, "runs": [{}]}
    evil["tags"] = [f"flowsubmit-producer:{OTHER_USER}"]
    os.pwrite(kept, json.dumps({**job, "stages": [{"runs": [{}]}, evil]}).encode(), 0)
    os.close(kept)
    daemon.process.kill()
    daemon.process.wait()

    again = start_daemon(settle_s=0, allowed_deployments=["driven/*"])
    asyncio.run(drive([first]))
    (second,) = set(asyncio.run(wait_for_runs(f"flowsubmit-job:{name}", 2))) - {first}
    asyncio.run(drive([second]))
    folder, result = again.wait_for(lambda: result_of(again.queue, name), what="the job's end")

    assert (folder, result["status"]) == ("done", "succeeded")
    assert [run["deployment"] for run in result["runs"]] == [DRIVEN, DRIVEN]
    assert (again.queue / "done" / f"{name}.json").read_bytes() == judged
    runs = asyncio.run(_runs_tagged(f"flowsubmit-job:{name}"))
    assert sorted(str(r.id) for r in runs) == sorted([first, second])
    assert all(f"flowsubmit-producer:{ETL_USER}" in r.tags for r in runs)
    assert not any(f"flowsubmit-producer:{OTHER_USER}" in r.tags for r in runs)
    assert [r.job_variables or {} for r in runs] == [{}, {}]
    assert len({r.deployment_id for r in runs}) == 1
