"""Bad input through the daemon: whatever lands in incoming/, it is judged, kept, explained, and nothing else is touched."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from flowsubmit.local.localserver import LocalServer
from tests.support.daemons import Daemon, result_of
from tests.support.driver import drive, wait_for_runs
from tests.support.flows import ETL, VAULT
from tests.support.jobs import make_job

DEPLOYMENT_HINT = "`prefect deployment ls` lists the deployments"
ID_RULE = (
    "an id is 1 to 128 characters: letters A-Z a-z, digits, '.', '_' and '-', "
    "starting with a letter or a digit"
)
#: The run of the jobs here unless a test names others: the ETL flow on table 1.
ONE_RUN = [{"parameters": {"table": 1}}]
ONLY_REGULAR = "not a regular file (a FIFO, device or directory); only regular files are accepted"


@pytest.fixture(scope="module")
def daemon(start_module_daemon: Callable[..., Daemon]) -> Daemon:
    """One daemon for the file-level cases of this module (settle_s=1)."""
    return start_module_daemon(settle_s=1)


def _error_files(queue: Path) -> dict[str, dict[str, Any]]:
    return {
        p.name.removesuffix(".error.json"): json.loads(p.read_text())
        for p in (queue / "rejected").glob("*.error.json")
    }


def _rejection(
    file: str, reason: str, field: str | None = None, hint: str | None = None
) -> dict[str, Any]:
    return {"file": file, "reason": reason, "field": field, "hint": hint}


def test_every_bad_file_is_rejected_with_its_error_and_good_ones_still_run(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Each kind of bad file lands in rejected/ (bytes kept, safe name, exact NAME.error.json, one log line); good ones, even oddly named, run."""
    incoming = daemon.queue / "incoming"
    outside = tmp_path / "outside.json"
    outside.write_bytes(make_job(deployment=ETL, runs=ONE_RUN, id="outside", into=bytes))
    files: dict[str, bytes] = {
        "t-not-json.json": b"run the nightly tables please",
        "t-empty.json": b"",
        "t-blank.json": b"   \n",
        "t-latin1.json": '{"deployment": "a/b", "runs": [{"name": "caf\xe9"}]}'.encode("latin-1"),
        "t-array.json": b"[]",
        "t-trailing.json": b'{"deployment": "a/b", "runs": [{}]} {}',
        "t-dup.json": b'{"deployment": "a/b", "deployment": "c/d", "runs": [{}]}',
        "t-typo.json": json.dumps({"deployment": ETL, "runz": [{}]}).encode(),
        "t-nodeploy.json": b'{"runs": [{}]}',
        "t-type.json": make_job(deployment=ETL, runs=ONE_RUN, max_concurrency="10", into=bytes),
        "t-noruns.json": json.dumps({"deployment": ETL, "runs": []}).encode(),
        "t-negative.json": make_job(deployment=ETL, runs=ONE_RUN, retries=-2, into=bytes),
        "t-huge.json": b'{"deployment": "a/b", "runs": [{}], "pad": "'
        + b"x" * (1024 * 1024)
        + b'"}',
        "t-deep.json": b"[" * 100_000,
        "t-bomb.json": json.dumps(
            {"deployment": ETL, "matrix": {f"k{i}": list(range(100)) for i in range(6)}}
        ).encode(),
        "t-id-path.json": make_job(
            deployment=ETL, runs=ONE_RUN, id="../../etc/cron.d/evil", into=bytes
        ),
        "t-id-long.json": make_job(deployment=ETL, runs=ONE_RUN, id="x" * 200, into=bytes),
        "t-nowhere.json": json.dumps({"deployment": "no-such-flow/nope", "runs": [{}]}).encode(),
        "t-badparam.json": make_job(
            deployment=ETL, runs=[{"parameters": {"table": "seven"}}], into=bytes
        ),
        "t-extraparam.json": make_job(
            deployment=ETL, runs=[{"parameters": {"table": 1, "colour": "red"}}], into=bytes
        ),
        "t-workqueue.json": make_job(
            deployment=ETL, runs=ONE_RUN, work_queue_name="nobody-listens", into=bytes
        ),
        "my bad job.json": b"{",
        "-rf --no-preserve-root.json": b"{",
        "café ☕.json": b"{",
        "two\nlines.json": b"{",
    }
    for name, data in files.items():
        (incoming / name).write_bytes(data)
    os.symlink(outside, incoming / "t-symlink.json")
    os.mkfifo(incoming / "t-fifo.json")
    (incoming / "t-dir.json").mkdir()
    os.link(outside, incoming / "t-hardlink.json")
    (incoming / os.fsdecode(b"t-\xff.json")).write_bytes(b"{")
    (incoming / "good with spaces é.json").write_bytes(
        make_job(deployment=ETL, runs=ONE_RUN, id="good-spaces", into=bytes)
    )
    (incoming / "good-bom.json").write_bytes(
        b"\xef\xbb\xbf" + make_job(deployment=ETL, runs=ONE_RUN, id="good-bom", into=bytes)
    )

    for job_id in ("good-spaces", "good-bom"):
        folder, _ = daemon.wait_for(lambda j=job_id: result_of(daemon.queue, j), what=job_id)
        assert folder == "done"
    expected = len(files) + 2  # the hard link and the bad name; links, FIFOs and folders stay
    errors = daemon.wait_for(
        lambda: len(e := _error_files(daemon.queue)) >= expected and e, what="all rejections"
    )

    bad_param = (
        "run 0: the deployment's parameter schema rejects it: 'seven' is not of type 'integer'"
    )
    assert errors == {
        "t-not-json.json": _rejection(
            "t-not-json.json", "not valid JSON: Expecting value at line 1 column 1"
        ),
        "t-empty.json": _rejection("t-empty.json", "the file is empty"),
        "t-blank.json": _rejection("t-blank.json", "the file holds only whitespace"),
        "t-latin1.json": _rejection(
            "t-latin1.json",
            "the file is not UTF-8 text (byte 0xe9 at offset 44)",
            hint="save it as UTF-8",
        ),
        "t-array.json": _rejection("t-array.json", "a job must be a JSON object, not a JSON array"),
        "t-trailing.json": _rejection(
            "t-trailing.json",
            "not valid JSON: unexpected data after the end of the JSON value at line 1 column 37",
        ),
        "t-dup.json": _rejection(
            "t-dup.json", "appears twice in the same JSON object", "deployment"
        ),
        "t-typo.json": _rejection("t-typo.json", "unknown key", "runz", "did you mean 'runs'?"),
        "t-nodeploy.json": _rejection(
            "t-nodeploy.json",
            "is missing: a job names the deployment to run",
            "deployment",
            "`flow-name/deployment-name`; `prefect deployment ls` lists the deployments",
        ),
        "t-type.json": _rejection(
            "t-type.json", 'must be a whole number, not "10"', "max_concurrency"
        ),
        "t-noruns.json": _rejection(
            "t-noruns.json",
            "the job has no runs: give `runs` or `matrix`",
            "runs",
            '`"runs": [{}]` is one run with the default parameters',
        ),
        "t-negative.json": _rejection("t-negative.json", "must be at least 0, not -2", "retries"),
        "t-huge.json": _rejection(
            "t-huge.json",
            f"the file is {len(files['t-huge.json'])} bytes, more than max_job_bytes (1048576)",
        ),
        "t-deep.json": _rejection(
            "t-deep.json", "JSON nesting is more than 32 levels deep (the limit)"
        ),
        "t-bomb.json": _rejection(
            "t-bomb.json",
            "the job expands to 1000000000000 runs, more than the limit of 10000",
            "matrix",
            "split it into several jobs or raise max_runs_per_job",
        ),
        "t-id-path.json": _rejection(
            "t-id-path.json", 'the job id contains a path separator "/"', "id", ID_RULE
        ),
        "t-id-long.json": _rejection(
            "t-id-long.json",
            "the job id is 200 characters long, more than the limit of 128",
            "id",
            ID_RULE,
        ),
        "t-nowhere.json": _rejection(
            "t-nowhere.json",
            "deployment 'no-such-flow/nope' not found or unreadable: HTTP 404: Deployment not found",
            "deployment",
            DEPLOYMENT_HINT,
        ),
        "t-badparam.json": _rejection("t-badparam.json", bad_param, "parameters.table"),
        "t-extraparam.json": _rejection(
            "t-extraparam.json",
            "run 0: the flow takes no parameter 'colour' (it takes: fail, mode, seconds, table)",
            "parameters.colour",
        ),
        "t-workqueue.json": _rejection(
            "t-workqueue.json",
            f"deployment '{ETL}' has no work pool, so `work_queue_name` cannot apply",
            "work_queue_name",
            'set "create_work_queue": true to allow a new queue',
        ),
        "my_bad_job.json": _rejection(
            "my bad job.json",
            "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2",
        ),
        "rf_--no-preserve-root.json": _rejection(
            "-rf --no-preserve-root.json",
            "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2",
        ),
        "caf_.json": _rejection(
            "café ☕.json",
            "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2",
        ),
        "two_lines.json": _rejection(
            "two\nlines.json",
            "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2",
        ),
        "t-_.json": _rejection(
            "t-\\xff.json",
            "not valid JSON: Expecting property name enclosed in double quotes at line 1 column 2",
        ),
        "t-hardlink.json": _rejection(
            "t-hardlink.json",
            "the file has other hard links; only files with one name are accepted",
            hint="copy it instead of linking it",
        ),
    }

    rejected = daemon.queue / "rejected"
    for name, data in files.items():
        safe = next(k for k, v in errors.items() if v["file"] == name)
        assert (rejected / safe).read_bytes() == data
    # Entries that are not regular files are never opened nor moved, only logged once each.
    # The link target is untouched.
    assert outside.read_bytes() == make_job(deployment=ETL, runs=ONE_RUN, id="outside", into=bytes)
    specials = ["t-dir.json", "t-fifo.json", "t-symlink.json"]
    assert sorted(os.listdir(daemon.queue / "incoming")) == specials
    assert sorted(line["file"] for line in daemon.events("job.ignored")) == specials
    logged = sorted(line["file"] for line in daemon.events("job.rejected"))
    assert logged == sorted(v["file"] for v in errors.values())
    assert daemon.process.poll() is None


def test_a_file_that_keeps_growing_is_never_rejected(daemon: Daemon) -> None:
    """A producer writing slowly straight into incoming/ is waited for, never rejected, and its job runs once complete."""
    data = make_job(deployment=ETL, runs=ONE_RUN, id="grown-slowly", into=bytes)
    path = daemon.queue / "incoming" / "growing.json"
    with open(path, "wb") as fh:
        for i in range(0, len(data), 2):
            fh.write(data[i : i + 2])
            fh.flush()
            time.sleep(0.2 if i < 40 else 0)  # 4 s of growth in steps shorter than settle_s
    folder, result = daemon.wait_for(lambda: result_of(daemon.queue, "grown-slowly"), what="job")

    assert (folder, result["status"]) == ("done", "succeeded")
    assert [line for line in daemon.events("job.rejected") if line["file"] == "growing.json"] == []
    assert not list((daemon.queue / "rejected").glob("growing*"))


SECRETS = {"password": "hunter2-pw", "token": "tok-4f9c1e", "api_key": "ak-77d2b0"}
PREFECT_KEY = "pnu_bogusbogusbogusbogusbogusbogus0001"


def test_secrets_never_reach_logs_or_results_and_files_are_private(
    served: LocalServer, spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    """Secret-like parameters and PREFECT_API_KEY appear in no log line, result or error file; the daemon warns on a world-writable queue and creates private files."""
    queue = tmp_path / "queue"
    queue.mkdir()
    queue.chmod(0o777)
    daemon = spawn(served.env(PREFECT_API_KEY=PREFECT_KEY), queue, run_tag="secrets-test")
    daemon.wait_for_event("service.ready")
    incoming = queue / "incoming"
    (incoming / "vault.json").write_text(
        json.dumps({"id": "vault-1", "deployment": VAULT, "runs": [{"parameters": SECRETS}]})
    )
    (incoming / "vault-bad.json").write_text(
        json.dumps(
            {
                "deployment": VAULT,
                "runs": [{"parameters": {"api_key": [SECRETS["api_key"]], "table": 1}}],
            }
        )
    )
    run_ids = asyncio.run(wait_for_runs("secrets-test", 1))
    asyncio.run(drive(run_ids))
    folder, result = daemon.wait_for(lambda: result_of(queue, "vault-1"), what="vault job")
    errors = daemon.wait_for(lambda: _error_files(queue), what="rejection")
    assert daemon.stop() == 0

    assert (daemon.events("service.queue_writable_by_others")[0]["queue"], folder) == (
        str(queue),
        "done",
    )
    assert result["runs"][0]["parameters"] == {"password": "***", "token": "***", "api_key": "***"}
    assert errors == {
        "vault-bad.json": _rejection(
            "vault-bad.json",
            "run 0: the deployment's parameter schema rejects it: the value does not fit the rule "
            "type='string' (not shown: it looks like a secret)",
            "parameters.api_key",
        )
    }
    written = [daemon.log_path.read_text()] + [
        p.read_text()
        for p in queue.rglob("*")
        if p.is_file() and p.name not in ("vault-1.json", "vault-bad.json")
    ]
    leaks = [s for s in [*SECRETS.values(), PREFECT_KEY] if any(s in text for text in written)]
    assert leaks == []
    created = [queue / f for f in ("tmp", "incoming", "processing", "done", "failed", "rejected")]
    created += [
        p for p in queue.rglob("*") if p.name.endswith((".result.json", ".error.json", ".journal"))
    ]
    assert len(created) >= 9
    assert {str(p.relative_to(queue)): stat.S_IMODE(p.stat().st_mode) & 0o027 for p in created} == {
        str(p.relative_to(queue)): 0 for p in created
    }


def test_five_thousand_files_at_once_are_all_judged(
    served: LocalServer, spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    """5,000 files dropped at once, 4,990 of them bad in 6 ways: every bad one rejected with its error, every good one runs."""
    queue = tmp_path / "queue"
    daemon = spawn(served.env(), queue, settle_s=0.5, max_concurrent_jobs=10)
    daemon.wait_for_event("service.ready")
    kinds = {
        "junk": (b"junk", "not valid JSON: Expecting value at line 1 column 1"),
        "empty": (b"", "the file is empty"),
        "typo": (json.dumps({"deployment": ETL, "runz": [{}]}).encode(), "unknown key"),
        "neg": (
            make_job(deployment=ETL, runs=ONE_RUN, retries=-1, into=bytes),
            "must be at least 0, not -1",
        ),
        "id": (
            make_job(deployment=ETL, runs=ONE_RUN, id="a/b", into=bytes),
            'the job id contains a path separator "/"',
        ),
        "deep": (b"[" * 50, "JSON nesting is more than 32 levels deep (the limit)"),
    }
    staged = queue / "tmp"
    expected: dict[str, str] = {}
    for i in range(5000):
        if i % 500 == 0:
            name, data = (
                f"{i:04d}-good.json",
                make_job(
                    deployment=ETL,
                    runs=[{"parameters": {"table": i, "seconds": 0}}],
                    id=f"flood-good-{i:04d}",
                    into=bytes,
                ),
            )
        else:
            kind = list(kinds)[i % len(kinds)]
            name, data = f"{i:04d}-{kind}.json", kinds[kind][0]
            expected[name] = kinds[kind][1]
        (staged / name).write_bytes(data)
    for name in sorted(os.listdir(staged)):
        os.rename(staged / name, queue / "incoming" / name)

    good = [f"flood-good-{i:04d}" for i in range(0, 5000, 500)]
    daemon.wait_for(
        lambda: all(result_of(queue, g) for g in good), timeout_s=180, what="10 good jobs"
    )
    daemon.wait_for(
        lambda: (
            sum(n.endswith(".error.json") for n in os.listdir(queue / "rejected")) == len(expected)
        ),
        timeout_s=180,
        what="4,990 rejections",
    )
    errors = _error_files(queue)

    assert {name: error["reason"] for name, error in errors.items()} == expected
    assert [result_of(queue, g)[0] for g in good] == ["done"] * 10  # type: ignore[index]
    assert len(daemon.events("job.rejected")) == 4990
    assert os.listdir(queue / "incoming") == []
