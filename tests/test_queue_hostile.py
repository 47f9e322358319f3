"""A hostile queue gets nothing it should not: grown files are never read whole, special entries never opened, echoed secrets are masked, forged heartbeats ignored."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from flowsubmit._types import RunSnapshot
from flowsubmit.cli import main
from flowsubmit.local.localserver import LocalServer
from flowsubmit.ops.heartbeat import Heartbeat, pid_namespace, scan
from flowsubmit.queue.folders import FOLDERS, safe_name
from tests.support import ROOT
from tests.support.daemons import Daemon, result_of
from tests.support.driver import wait_for_runs
from tests.support.flows import VAULT

#: A job file grown after its claim: far more than ``max_job_bytes`` (1 MiB by default).
GROWN_BYTES = 300 * 1024 * 1024
#: The peak memory a command may reach while such a file sits in the queue (it was 660-927 MB).
PEAK_LIMIT_KIB = 200 * 1024
#: A command that waits on a FIFO never answers; one that does answers well within this.
ANSWER_S = 30.0
#: Another user than the daemon's (root's): the owner of a forged heartbeat file.
STRANGER_UID = 4242

#: Runs ``argv`` and reports how it ended and the peak memory of it alone, as JSON.
_MEASURE = (
    "import json, resource, subprocess, sys\n"
    "done = subprocess.run(sys.argv[2:], capture_output=True, text=True, timeout=float(sys.argv[1]))\n"
    "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
    "print(json.dumps([done.returncode, done.stdout, done.stderr, peak]))\n"
)


@pytest.fixture(autouse=True)
def _structlog_defaults() -> Iterator[None]:
    """`main()` in-process configures structlog onto this test's captured stdout: undo it."""
    yield
    structlog.reset_defaults()


def _queue(root: Path) -> Path:
    for folder in FOLDERS:
        (root / folder).mkdir(parents=True, exist_ok=True)
    return root


def _flowsubmit(*args: str) -> tuple[int, str, str, int]:
    """``flowsubmit ARGS`` in a process of its own: (exit code, stdout, stderr, peak memory in KiB).

    A command that hangs is killed after ``ANSWER_S`` and fails the test.
    """
    argv = [sys.executable, "-m", "flowsubmit.cli", *args]
    measured = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(ANSWER_S), *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=ANSWER_S + 30,
    )
    assert "TimeoutExpired" not in measured.stderr, f"flowsubmit {' '.join(args)} hung"
    code, out, err, peak = json.loads(measured.stdout)
    return code, out, err, peak


def _job(job_id: str) -> bytes:
    return json.dumps({"id": job_id, "deployment": "etl/etl", "runs": [{}, {}]}).encode()


def _error(name: str, reason: str) -> bytes:
    body = {"file": name, "reason": reason, "field": None, "hint": None}
    return json.dumps(body).encode()


# -- max_job_bytes holds on every read ----------------------------------------------------------


def test_status_answers_in_bounded_memory_when_a_claimed_job_file_grew(tmp_path: Path) -> None:
    """A job file grown to 300 MB after its claim shows an unknown total; `status` never reads it whole."""
    q = _queue(tmp_path / "q")
    (q / "processing" / "small.json").write_bytes(_job("small"))
    grown = q / "processing" / "grown.json"
    grown.write_bytes(_job("grown"))
    os.truncate(grown, GROWN_BYTES)  # sparse: no disk, but every reader pays for 300 MB

    code, out, err, peak_kib = _flowsubmit("status", "--queue", str(q), "--json")

    assert (code, err) == (0, "")
    runs = {job["job_id"]: job["runs"]["total"] for job in json.loads(out)["jobs"]}
    assert runs == {"grown": None, "small": 2}
    assert peak_kib < PEAK_LIMIT_KIB, f"status peaked at {peak_kib // 1024} MiB"


def test_cancel_answers_in_bounded_memory_when_a_waiting_file_grew(tmp_path: Path) -> None:
    """`cancel` looks for a job by the id inside waiting files without reading a 300 MB one whole (Queue.waiting)."""
    q = _queue(tmp_path / "q")
    grown = q / "incoming" / "grown.json"
    grown.write_bytes(_job("grown"))
    os.truncate(grown, GROWN_BYTES)

    code, out, err, peak_kib = _flowsubmit("cancel", "--queue", str(q), "elsewhere")

    assert (code, out) == (2, "")
    assert err.splitlines()[0] == (
        "flowsubmit: cancel elsewhere: no such job in incoming/, processing/, done/, failed/ "
        "or rejected/"
    )
    assert peak_kib < PEAK_LIMIT_KIB, f"cancel peaked at {peak_kib // 1024} MiB"


# -- entries that are not regular files are skipped, never opened ------------------------------


def test_status_skips_a_fifo_and_a_directory_named_like_error_files(tmp_path: Path) -> None:
    """A FIFO and a directory named `*.error.json` in rejected/ are skipped: `status --json` answers with the real rejection."""
    q = _queue(tmp_path / "q")
    rejected = q / "rejected"
    (rejected / "bad.json").write_bytes(b"junk")
    (rejected / "bad.json.error.json").write_bytes(_error("bad.json", "not valid JSON"))
    os.mkfifo(rejected / "x.error.json")
    (rejected / "d.error.json").mkdir()

    code, out, err, _ = _flowsubmit("status", "--queue", str(q), "--json")

    assert (code, err) == (0, "")
    rejections = json.loads(out)["rejections"]
    assert [(r["file"], r["reason"], r["field"]) for r in rejections] == [
        ("bad.json", "not valid JSON", None)
    ]


def test_prune_skips_entries_that_are_not_regular_files_and_removes_the_rest(
    tmp_path: Path,
) -> None:
    """Directories and a FIFO among old finished jobs are skipped and reported; every regular file of those jobs is removed."""
    q = _queue(tmp_path / "q")
    (q / "done" / "a-dir.result.json").mkdir()  # sorts first: it used to stop the prune
    (q / "done" / "b.json").mkdir()  # the job "file" of a real result
    (q / "done" / "b.result.json").write_bytes(b"{}")
    (q / "done" / "c.json").write_bytes(_job("c"))
    (q / "done" / "c.result.json").write_bytes(b"{}")
    (q / "done" / "c.journal").write_bytes(b"")
    os.mkfifo(q / "rejected" / "f.json")
    (q / "rejected" / "f.json.error.json").write_bytes(_error("f.json", "not a regular file"))
    old = time.time() - 8 * 86400
    for path in [*(q / "done").iterdir(), *(q / "rejected").iterdir()]:
        os.utime(path, (old, old), follow_symlinks=False)

    code, out, err, _ = _flowsubmit("prune", "--queue", str(q), "--older-than", "7d")

    assert (code, err) == (0, "")
    assert out.splitlines()[-1] == "removed 3 job(s), 5 file(s)"
    skipped = [line.split(None, 2)[2] for line in out.splitlines() if "retention.skipped" in line]
    assert skipped == [
        "retention.skipped  folder=done name=a-dir.result.json kind=directory dry_run=false",
        "retention.skipped  folder=done name=b.json kind=directory dry_run=false",
        "retention.skipped  folder=rejected name=f.json kind=fifo dry_run=false",
    ]
    assert sorted(str(p.relative_to(q)) for p in q.rglob("*") if p.parent != q) == [
        "done/a-dir.result.json",
        "done/b.json",
        "rejected/f.json",
    ]


def test_cancel_does_not_hang_on_a_fifo_in_incoming(tmp_path: Path) -> None:
    """A FIFO among the waiting files is not opened for reading: `cancel` answers (Queue.waiting)."""
    q = _queue(tmp_path / "q")
    os.mkfifo(q / "incoming" / "pipe.json")

    code, out, err, _ = _flowsubmit("cancel", "--queue", str(q), "elsewhere")

    assert (code, out) == (2, "")
    assert err.splitlines()[0] == (
        "flowsubmit: cancel elsewhere: no such job in incoming/, processing/, done/, failed/ "
        "or rejected/"
    )


# -- a secret echoed back is masked wherever it would be written -------------------------------


def test_a_rejection_masks_secret_assignments_in_its_reason_and_hint() -> None:
    """`password=hunter2` echoed by a rejection loses its value in the reason, the hint, the error file body and the message."""
    from flowsubmit.errors import JobRejected
    from flowsubmit.jobs.model import check_job

    _, problems = check_job(
        b'{"deployment": "a/b", "parameters": "password=hunter2"}', file="x.json", max_runs=10
    )
    made = JobRejected("bad {'api_key': 'abc123'}", file="y.json", hint="try token: t0k3n")

    assert [p.as_dict() for p in problems] == [
        {
            "file": "x.json",
            "reason": 'must be an object, not "password=***"',
            "field": "parameters",
            "hint": None,
        }
    ]
    assert (made.reason, made.hint) == ("bad {'api_key': '***'}", "try token: ***")
    assert str(made) == "y.json: bad {'api_key': '***'} (try token: ***)"


def test_a_journal_final_record_is_masked_like_the_result(tmp_path: Path) -> None:
    """The daemon's ledger writes a final record whose state message is masked as the result file's is."""
    from flowsubmit.engine.results import RunRecord
    from flowsubmit.queue.journal import Journal
    from flowsubmit.service.executor import _JournalLedger

    message = (
        "ValueError: bad config {'api_key': 'abc123', 'table': 3}; retry with password=hunter2"
    )
    masked = "ValueError: bad config {'api_key': '***', 'table': 3}; retry with password=***"
    snap = RunSnapshot("r1", "FAILED", "Failed", source="event", state_message=message)
    journal, state = Journal.open(tmp_path / "j.journal")
    record = RunRecord(0, 0, "a/b", {"token": "s3cr3t-value"})
    _JournalLedger(journal, state).add_final(record, snap)
    journal.close()
    record = RunRecord(0, 0, "f/d", {"table": 3})
    record.record(snap)

    (line,) = (tmp_path / "j.journal").read_text().splitlines()
    assert json.loads(line)["state_message"] == masked
    assert record.as_dict()["state_message"] == masked


async def _fail(run_id: str, message: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.states import Failed, Pending, Running

    async with get_client() as client:
        for state in (Pending(), Running(), Failed(message=message)):
            await client.set_flow_run_state(run_id, state, force=True)


def test_journals_error_files_and_log_lines_keep_no_echoed_secret(
    served: LocalServer, spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A failed run's message with `{'api_key': ...}` is masked in failed/JOB.journal; `password=...` in a bad file is masked in its error file and `job.rejected`."""
    queue = tmp_path / "queue"
    daemon = spawn(served.env(), queue, run_tag="hostile-masks")
    daemon.wait_for_event("service.ready")
    (queue / "incoming" / "bad.json").write_text(
        json.dumps({"deployment": VAULT, "parameters": "password=hunter2"})
    )
    (queue / "incoming" / "vault.json").write_text(
        json.dumps({"id": "masked", "deployment": VAULT, "runs": [{"parameters": {"table": 1}}]})
    )
    (run_id,) = asyncio.run(wait_for_runs("hostile-masks", 1))
    asyncio.run(_fail(run_id, "bad config {'api_key': 'abc123', 'table': 1}"))
    folder, result = daemon.wait_for(lambda: result_of(queue, "masked"), what="the failed job")
    (logged,) = daemon.wait_for_event("job.rejected")
    assert daemon.stop() == 0

    finals = [
        json.loads(line)
        for line in (queue / "failed" / "masked.journal").read_text().splitlines()
        if '"rec":"final"' in line
    ]
    expected = "bad config {'api_key': '***', 'table': 1}"
    assert (folder, [f["state_message"] for f in finals]) == ("failed", [expected])
    assert result["runs"][0]["state_message"] == expected
    reason = 'must be an object, not "password=***"'
    error = json.loads((queue / "rejected" / "bad.json.error.json").read_text())
    assert error == {"file": "bad.json", "reason": reason, "field": "parameters", "hint": None}
    assert (logged["file"], logged["reason"]) == ("bad.json", reason)
    written = [daemon.log_path.read_text()] + [
        p.read_text() for p in queue.rglob("*") if p.is_file() and p.name != "bad.json"
    ]
    assert [s for s in ("abc123", "hunter2") if any(s in text for text in written)] == []


# -- a heartbeat is trusted by its owner, its kind and its content, not by its name -------------


def _beat(pid: object, **fields: Any) -> bytes:
    document = {
        "pid": pid,
        "host": socket.gethostname(),
        "pid_ns": pid_namespace(),
        "queue": "/q",
        "version": "0",
        "time": time.time(),
        "stale_after_s": 12.0,
        "tracker": "streaming",
        "prefect_reachable": True,
        "prefect_unreachable_since": None,
        **fields,
    }
    return json.dumps(document).encode()


def _beat_path(q: Path, pid: int) -> Path:
    return q / f"heartbeat-{safe_name(socket.gethostname())}-{pid_namespace()}-{pid}.json"


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_health_ignores_forged_and_malformed_heartbeat_files(tmp_path: Path) -> None:
    """A beat of pid 1 owned by another user, a string pid, beats misnamed by pid or PID namespace and a FIFO are ignored: health says no daemon and counts them."""
    q = _queue(tmp_path / "q")
    forged = _beat_path(q, 1)
    forged.write_bytes(_beat(1))
    os.chown(forged, STRANGER_UID, -1)
    _beat_path(q, 2).write_bytes(_beat(1))  # named for pid 2, says pid 1
    _beat_path(q, 3).write_bytes(_beat("x"))
    _beat_path(q, 4).write_bytes(_beat(4, time="soon"))
    os.mkfifo(_beat_path(q, 5))
    other_ns = _beat_path(q, 6).with_name(
        _beat_path(q, 6).name.replace(f"-{pid_namespace()}-", "-7-")
    )
    other_ns.write_bytes(_beat(6))  # named for PID namespace 7, says this one

    code, out, err, _ = _flowsubmit("health", "--queue", str(q))
    status = json.loads(_flowsubmit("status", "--queue", str(q), "--json")[1])

    assert (code, out) == (1, "")
    assert err == (
        f"flowsubmit: health: no daemon serves {q} (no heartbeat file from this host) "
        "(ignored 6 untrusted heartbeat files)\n"
    )
    assert status["daemons"] == []
    assert scan(q).untrusted == 6


@pytest.mark.skipif(os.geteuid() != 0, reason="chown to another user needs root")
def test_a_daemon_removes_only_the_dead_beats_it_trusts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """At its first beat a daemon deletes its own user's beat of a dead pid, never another user's file of one."""
    q = _queue(tmp_path / "q")
    dead = subprocess.Popen(["true"])
    dead.wait()
    trusted, forged = _beat_path(q, dead.pid), _beat_path(q, dead.pid + 1_000_000)
    trusted.write_bytes(_beat(dead.pid))
    forged.write_bytes(_beat(dead.pid + 1_000_000))
    os.chown(forged, STRANGER_UID, -1)

    heartbeat = Heartbeat(q, version="test")
    heartbeat.beat(every_s=1.0, tracker="streaming", prefect_down_s=None)
    code = main(["health", "--queue", str(q)])
    out, _ = capsys.readouterr()
    heartbeat.remove()

    assert (trusted.exists(), forged.exists()) == (False, True)
    assert code == 0
    assert out.startswith(f"ok: pid {os.getpid()} passed its loop ")
    assert out.endswith(
        ", tracker streaming, Prefect reachable (ignored 1 untrusted heartbeat file)\n"
    )
