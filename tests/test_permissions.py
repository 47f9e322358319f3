"""The documented permission model with real users: the setup block of docs/operations.md, run as written, keeps producers apart.

The module creates a daemon user, two producers (alice and mallory) and their group
by running the setup block itself (names and path substituted), so the docs and
the test cannot drift; every command a producer runs goes through ``setpriv`` as
that producer, with a timeout.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from flowsubmit.local.localserver import LocalServer
from tests.support import ROOT
from tests.support.daemons import Daemon, settings_env
from tests.support.driver import drive, wait_for_runs
from tests.support.flows import VAULT
from tests.support.users import (
    COMMAND_TIMEOUT_S,
    User,
    add_user,
    remove_accounts,
    remove_leftovers,
    run_as,
    user,
)

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="creating users needs root"),
    # One worker runs the whole module: its accounts are created once, by the setup block.
    pytest.mark.xdist_group("permissions"),
]

#: This process's accounts: the pid in their names keeps two test sessions on one host apart,
#: and tells the accounts an interrupted session left (its pid gone) from a live one's.
PREFIX = f"fsperm{os.getpid()}-"
DAEMON, ALICE, MALLORY, PRODUCERS = (
    f"{PREFIX}daemon",
    f"{PREFIX}alice",
    f"{PREFIX}mallory",
    f"{PREFIX}producers",
)
#: The marker line before the setup block in docs/operations.md.
MARKER = "<!-- permission-setup:"
#: What the test puts in place of the block's names and path (each must occur in it), in this order.
SUBSTITUTIONS = (
    (r"/var/spool/flowsubmit", "QUEUE_DIR"),
    (r"\bflowsubmit-producers\b", PRODUCERS),
    (r"\bflowsubmit\b", DAEMON),
    (r"\balice bob\b", f"{ALICE} {MALLORY}"),
    (r"\bQUEUE_DIR\b", "{queue}"),
)
#: alice's secret, in the parameters of her job.
SECRET = "hunter2-of-alice"
FLOWSUBMIT = (sys.executable, "-m", "flowsubmit.cli")


@dataclass(frozen=True)
class Site:
    """The queue made by the documented setup, and the users it serves."""

    queue: Path
    daemon: User
    alice: User
    mallory: User


def setup_block() -> str:
    """The ```sh block that follows the marker in docs/operations.md, as written there."""
    text = (ROOT / "docs" / "operations.md").read_text()
    match = re.search(re.escape(MARKER) + r"[^\n]*\n```sh\n(.*?)\n```\n", text, re.DOTALL)
    assert match is not None, f"docs/operations.md has no ```sh block after {MARKER!r}"
    return match.group(1)


def _localised(block: str, queue: Path) -> str:
    for pattern, replacement in SUBSTITUTIONS:
        assert re.search(pattern, block), f"the setup block no longer mentions {pattern!r}"
        block = re.sub(pattern, replacement.format(queue=queue), block)
    return block


def _home(base: Path, owner: User, server: LocalServer) -> User:
    """``owner`` with a HOME and PREFECT_HOME of its own (Prefect writes there), the server's API, a C locale."""
    home = base / f"home-{owner.name}"
    home.mkdir(mode=0o700)
    os.chown(home, owner.uid, owner.gid)
    env = server.env(
        HOME=str(home),
        PREFECT_HOME=str(home),
        PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
        LC_ALL="C",
    )
    return User(owner.name, owner.uid, owner.gid, env)


@pytest.fixture(scope="module")
def site(served: LocalServer) -> Iterator[Site]:
    """The documented setup, run as root on a queue every user can reach; accounts removed at the end."""
    if shutil.which("setfacl") is None:
        pytest.fail("setfacl is missing: install the acl package (.ci/run: apt-get install -y acl)")
    remove_leftovers(re.compile(r"fsperm(\d+)-"))
    base = Path(tempfile.mkdtemp(prefix="fs-perm-"))
    base.chmod(0o755)  # pytest's tmp_path is 0700: no other user could reach a queue in it
    queue = base / "queue"
    try:
        add_user(ALICE)
        add_user(MALLORY)
        done = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", _localised(setup_block(), queue)],
            capture_output=True,
            text=True,
            timeout=COMMAND_TIMEOUT_S,
        )
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
        probe = run_as(
            user(ALICE, {"PATH": os.environ["PATH"]}), sys.executable, "-c", "import flowsubmit"
        )
        assert probe.returncode == 0, f"another user cannot run {sys.executable}: {probe.stderr}"
        yield Site(
            queue,
            _home(base, user(DAEMON), served),
            _home(base, user(ALICE), served),
            _home(base, user(MALLORY), served),
        )
    finally:
        remove_accounts([DAEMON, ALICE, MALLORY], [PRODUCERS])
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def daemon(site: Site, tmp_path: Path) -> Iterator[Daemon]:
    """``flowsubmit run`` as the daemon's user on the site's queue, once ready; stopped afterwards."""
    log_path = tmp_path / "daemon.log"
    env = {
        **site.daemon.env,
        **settings_env({"poll_interval_s": 1, "rescan_interval_s": 0.5, "settle_s": 0}),
    }
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            site.daemon.argv(*FLOWSUBMIT, "run", "--queue", str(site.queue)),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    running = Daemon(site.queue, process, log_path)
    try:
        running.wait_for_event("service.ready")
        yield running
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _flowsubmit(
    who: User, *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return run_as(who, *FLOWSUBMIT, *args, stdin=stdin, cwd=ROOT)


def _sh(who: User, script: str) -> subprocess.CompletedProcess[str]:
    """``script`` run by ``sh`` as ``who``, with umask 022 (a file is world-readable unless the folder says otherwise)."""
    return run_as(who, "sh", "-c", f"umask 022; {script}")


def _outcome(done: subprocess.CompletedProcess[str]) -> tuple[int, str, str]:
    return done.returncode, done.stdout, done.stderr


def _job(job_id: str) -> dict[str, Any]:
    return {
        "id": job_id,
        "deployment": VAULT,
        "parameters": {"password": SECRET},
        "runs": [{"parameters": {"table": 1}}],
    }


def _entries(folder: Path) -> dict[str, str]:
    """The names of ``folder`` and their owners."""
    return {p.name: p.owner() for p in sorted(folder.iterdir())}


def test_a_producer_cannot_read_delete_rename_or_replace_another_producers_waiting_files(
    site: Site,
) -> None:
    """Alice's waiting job and her staged file (written with umask 022) are unreadable by mallory, who can neither delete them, launch the staged one, nor rename her own file over alice's name; a user outside the group cannot even list the queue."""
    q = site.queue
    dropped = _flowsubmit(
        site.alice, "enqueue", "--queue", str(q), "-", stdin=json.dumps(_job("drop"))
    )
    assert _outcome(dropped) == (0, f"drop@{ALICE}\n", ""), dropped.stderr
    staged = _sh(
        site.alice, f"printf '%s' '{json.dumps(_job('staged'))}' > {q}/tmp/staged.json.part"
    )
    assert _outcome(staged) == (0, "", "")
    waiting, part = q / "incoming" / "drop.json", q / "tmp" / "staged.json.part"

    assert (oct(waiting.stat().st_mode & 0o777), oct(part.stat().st_mode & 0o777)) == (
        "0o640",
        "0o640",
    )
    assert _outcome(_sh(site.mallory, f"cat {waiting}")) == (
        1,
        "",
        f"cat: {waiting}: Permission denied\n",
    )
    assert _outcome(_sh(site.mallory, f"cat {part}")) == (
        1,
        "",
        f"cat: {part}: Permission denied\n",
    )
    assert _outcome(_sh(site.mallory, f"rm -f {waiting}")) == (
        1,
        "",
        f"rm: cannot remove '{waiting}': Operation not permitted\n",
    )
    launched = _sh(site.mallory, f"mv {part} {q}/incoming/staged.json")
    assert _outcome(launched) == (
        1,
        "",
        f"mv: cannot move '{part}' to '{q}/incoming/staged.json': Operation not permitted\n",
    )
    mine = q / "tmp" / "mine.json.part"
    replaced = _sh(site.mallory, f"echo '{{}}' > {mine} && mv {mine} {waiting}")
    assert _outcome(replaced) == (
        1,
        "",
        f"mv: cannot move '{mine}' to '{waiting}': Operation not permitted\n",
    )
    assert (_entries(q / "incoming"), _entries(q / "tmp")) == (
        {"drop.json": ALICE},
        {"mine.json.part": MALLORY, "staged.json.part": ALICE},
    )
    assert json.loads(_sh(site.alice, f"cat {waiting}").stdout) == _job("drop")
    anyone = user("nobody", {"PATH": os.environ["PATH"], "LC_ALL": "C"})
    assert _outcome(_sh(anyone, f"ls {q}")) == (
        2,
        "",
        f"ls: cannot open directory '{q}': Permission denied\n",
    )

    # Each producer may withdraw her own files (the sticky bit lets an owner delete).
    assert _outcome(_sh(site.alice, f"rm {waiting} {part}")) == (0, "", "")
    assert _outcome(_sh(site.mallory, f"rm {mine}")) == (0, "", "")
    assert (_entries(q / "incoming"), _entries(q / "tmp")) == ({}, {})


def _waiting(who: User, job_file: Path, queue: Path) -> subprocess.Popen[str]:
    """``flowsubmit enqueue --wait`` as ``who``, not waited for."""
    return subprocess.Popen(
        who.argv(*FLOWSUBMIT, "enqueue", "--wait", "--queue", str(queue), str(job_file)),
        env=who.env,
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ended(process: subprocess.Popen[str]) -> tuple[int, str, str]:
    """How a waiting command ended; one that does not end in time is killed and fails the test."""
    try:
        out, err = process.communicate(timeout=COMMAND_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        raise
    return process.returncode, out, err


def _read_as(who: User, path: Path) -> Any:
    done = _sh(who, f"cat {path}")
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    return json.loads(done.stdout)


def _denied(who: User, path: Path) -> None:
    assert _outcome(_sh(who, f"cat {path}")) == (1, "", f"cat: {path}: Permission denied\n")


def test_producers_run_jobs_of_one_id_and_read_only_their_own_results(
    site: Site, daemon: Daemon
) -> None:
    """With the daemon running as its own user, alice and mallory each enqueue --wait a job of the same id: both run to their own result, which only its producer reads, and status and health answer both."""
    q, alice, mallory = site.queue, site.alice, site.mallory
    job_file = q.parent / "nightly.json"
    job_file.write_text(json.dumps(_job("nightly")))
    job_file.chmod(0o644)
    waits = {who.name: _waiting(who, job_file, q) for who in (alice, mallory)}
    try:
        for owner in (ALICE, MALLORY):
            asyncio.run(drive(asyncio.run(wait_for_runs(f"flowsubmit-job:nightly@{owner}", 1))))
        ended = {name: _ended(p) for name, p in waits.items()}
    finally:
        for process in waits.values():
            process.kill()  # a no-op once it has ended; its user could not be removed otherwise
            process.communicate()

    summary = "Summary → 1/1 succeeded, 0 failed\n"
    assert ended == {
        ALICE: (0, f"nightly@{ALICE}\n{summary}", ""),
        MALLORY: (0, f"nightly@{MALLORY}\n{summary}", ""),
    }
    done = q / "done"
    results = {
        who.name: _read_as(who, done / f"nightly@{who.name}.result.json")
        for who in (alice, mallory)
    }
    assert {name: (r["job_id"], r["status"], r["producer"]) for name, r in results.items()} == {
        ALICE: (f"nightly@{ALICE}", "succeeded", {"uid": alice.uid, "user": ALICE}),
        MALLORY: (f"nightly@{MALLORY}", "succeeded", {"uid": mallory.uid, "user": MALLORY}),
    }
    (alice_run,), (mallory_run,) = results[ALICE]["runs"], results[MALLORY]["runs"]
    assert alice_run["flow_run_id"] != mallory_run["flow_run_id"]
    assert _read_as(alice, done / f"nightly@{ALICE}.json") == _job("nightly")
    claimed = json.loads(_sh(alice, f"cat {done}/nightly@{ALICE}.journal").stdout.splitlines()[0])
    assert (claimed["rec"], claimed["job_id"], claimed["producer"]) == (
        "claimed",
        f"nightly@{ALICE}",
        {"uid": alice.uid, "user": ALICE},
    )
    for reader, owner in ((mallory, ALICE), (alice, MALLORY)):
        for suffix in (".json", ".result.json", ".journal"):
            _denied(reader, done / f"nightly@{owner}{suffix}")
    names = sorted(
        f"nightly@{o}{s}" for o in (ALICE, MALLORY) for s in (".json", ".result.json", ".journal")
    )
    assert (
        sorted(_sh(mallory, f"ls {done}").stdout.split()) == names
    )  # names are visible, not contents

    # A rejected file stays alice's; its error file is granted to her alone.
    bad = {"deployment": VAULT, "runs": [{}], "tags": ["flowsubmit-job:other"]}
    dropped = _sh(
        alice,
        f"printf '%s' '{json.dumps(bad)}' > {q}/tmp/bad.part && mv {q}/tmp/bad.part {q}/incoming/bad.json",
    )
    assert _outcome(dropped) == (0, "", "")
    rejected = q / "rejected" / f"bad@{ALICE}.json"
    error_file = rejected.with_name(f"{rejected.name}.error.json")
    daemon.wait_for(error_file.exists, what="alice's rejected file")
    assert (_read_as(alice, rejected), _read_as(alice, error_file)["field"]) == (bad, "tags.0")
    _denied(mallory, rejected)
    _denied(mallory, error_file)

    for who in (alice, mallory):
        health = _flowsubmit(who, "health", "--queue", str(q))
        assert (
            health.returncode,
            health.stdout.startswith(f"ok: pid {daemon.process.pid} "),
            health.stderr,
        ) == (0, True, "")
        status = _flowsubmit(who, "status", "--json", "--queue", str(q))
        assert (status.returncode, status.stderr) == (0, ""), status.stderr
        document = json.loads(status.stdout)
        seen = (
            document["counts"],
            [d["pid"] for d in document["daemons"] if d["healthy"]],
            [r["file"] for r in document["rejections"]],
        )
        assert seen == (
            {"incoming": 0, "processing": 0, "done": 2, "failed": 0, "rejected": 1},
            [daemon.process.pid],
            [f"bad@{ALICE}.json"] if who is alice else [],
        )


def _running(site: Site, job_id: str) -> None:
    """alice and mallory each enqueue ``job_id`` (its run never ends on its own); return once both runs exist."""
    for who in (site.alice, site.mallory):
        dropped = _flowsubmit(
            who, "enqueue", "--queue", str(site.queue), "-", stdin=json.dumps(_job(job_id))
        )
        assert _outcome(dropped) == (0, f"{job_id}@{who.name}\n", "")
    for owner in (ALICE, MALLORY):
        asyncio.run(wait_for_runs(f"flowsubmit-job:{job_id}@{owner}", 1))


def _operator_cancels(queue: Path, name: str) -> tuple[int, str, str]:
    """``flowsubmit cancel --wait NAME`` as root, the queue's operator."""
    done = subprocess.run(
        [*FLOWSUBMIT, "cancel", "--wait", "--queue", str(queue), name],
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        cwd=ROOT,
    )
    return _outcome(done)


def test_a_producer_cannot_cancel_and_the_operator_cancels_by_the_scoped_name(
    site: Site, daemon: Daemon
) -> None:
    """A producer's cancel fails (it writes in processing/: a documented limit) and leaves the job running; the operator cancels it by its ID@USER name, and the cancelled result is its producer's alone."""
    q, alice, mallory = site.queue, site.alice, site.mallory
    _running(site, "long")
    refused = _flowsubmit(alice, "cancel", "--queue", str(q), f"long@{ALICE}")
    assert (refused.returncode, refused.stderr) == (
        1,
        f"flowsubmit: cancel long@{ALICE}: permission denied: only the daemon's user (or root) "
        "may cancel a job\n  hint: ask the queue's operator; a job still waiting in incoming/ is "
        "yours to remove\n",
    )
    running = q / "processing" / f"long@{ALICE}"
    assert _read_as(alice, running.with_suffix(".json")) == _job("long")
    _denied(mallory, running.with_suffix(".json"))
    _denied(mallory, running.with_suffix(".journal"))
    assert sorted(p.name for p in (q / "processing").glob("long@*.json")) == [
        f"long@{ALICE}.json",
        f"long@{MALLORY}.json",
    ]

    summary = "Summary → 0/1 succeeded, 0 failed, 1 cancelled\n"
    for owner in (ALICE, MALLORY):
        assert _operator_cancels(q, f"long@{owner}") == (
            0,
            f"cancel requested for long@{owner}\n{summary}",
            "",
        )
    result = q / "failed" / f"long@{ALICE}.result.json"
    assert (
        _read_as(alice, result)["status"],
        sorted(p.name for p in (q / "processing").iterdir()),
    ) == ("cancelled", [])
    _denied(mallory, result)


def test_status_as_a_producer_while_another_producers_job_runs(site: Site, daemon: Daemon) -> None:
    """While jobs of alice and mallory run, status --json as alice exits 0, lists both, and shows hers alive with its runs."""
    q = site.queue
    _running(site, "busy")
    try:
        status = _flowsubmit(site.alice, "status", "--json", "--queue", str(q))
        assert (status.returncode, status.stderr) == (0, "")
        jobs = {j["job_id"]: j for j in json.loads(status.stdout)["jobs"]}
        assert sorted(jobs) == [f"busy@{ALICE}", f"busy@{MALLORY}"]
        mine = jobs[f"busy@{ALICE}"]
        assert (mine["owner"], mine["runs"]["total"], mine["runs"]["created"]) == ("alive", 1, 1)
        theirs = jobs[f"busy@{MALLORY}"]  # its name only: its files are mallory's to read
        assert (theirs["owner"], theirs["runs"]["total"], theirs["runs"]["created"]) == (
            "unknown",
            None,
            None,
        )
    finally:
        for owner in (ALICE, MALLORY):
            assert _operator_cancels(q, f"busy@{owner}")[0] == 0


def test_the_documented_setup_raises_no_writable_queue_warning(daemon: Daemon) -> None:
    """A daemon on the documented setup does not warn that the queue is writable by others."""
    assert daemon.events("service.queue_writable_by_others") == []
