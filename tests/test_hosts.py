"""Several hosts on one queue: two daemons in separate PID and mount namespaces (``unshare``),
each pid 1, share one queue directory; one is killed mid-job. Each has a UTS namespace and a
hostname of its own, or both keep the node's hostname (containers on ``--network host``).

What each namespace shares with the other is what two containers on one node share: the
kernel (so ``flock`` and ``rename`` are the kernel's own) and the queue volume. A
namespace's pid 1 dying takes everything in it, as a container's does.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from flowsubmit.engine.runset import job_tag
from flowsubmit.local.localserver import LocalServer
from flowsubmit.ops.heartbeat import health as heartbeat_health
from flowsubmit.queue.folders import Queue
from tests.support import ROOT, jobs
from tests.support.crashkit import server_runs
from tests.support.daemons import FAST, Daemon, result_of, settings_env
from tests.support.driver import drive
from tests.support.flows import DRIVEN

pytestmark = [
    pytest.mark.skipif(
        shutil.which("unshare") is None or os.geteuid() != 0, reason="needs unshare as root"
    ),
    pytest.mark.xdist_group("hosts"),
]

JOBS = 30
RUNS_PER_JOB = 2


def _host_daemon(
    home: Path, name: str, host: str | None, queue: Path, env: dict[str, str]
) -> Daemon:
    """``flowsubmit run`` as pid 1 of new PID and mount namespaces: with hostname ``host`` in a
    UTS namespace of its own, or with the node's hostname when ``host`` is None."""
    settings = {**FAST, "max_concurrent_jobs": JOBS}
    log_path = home / f"{name}.log"
    uts = [] if host is None else ["--uts"]
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            [
                "unshare",
                "--pid",
                "--fork",
                *uts,
                "--mount",
                "--mount-proc",
                "--kill-child",
                "sh",
                "-c",
                '[ -z "$0" ] || hostname "$0"; exec "$@"',
                host or "",
                sys.executable,
                "-m",
                "flowsubmit.cli",
                "run",
                "--queue",
                str(queue),
            ],
            env={**env, **settings_env(settings)},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    return Daemon(queue, process, log_path)


def _pid1(daemon: Daemon) -> int:
    """The host's pid of the namespace's pid 1 (the daemon; ``unshare`` is its parent)."""
    pid = daemon.process.pid
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return int(children[0])


def _in_namespace(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``flowsubmit ARGS`` inside the daemon's namespaces (as ``kubectl exec`` would)."""
    return subprocess.run(
        [
            "nsenter",
            "-t",
            str(_pid1(daemon)),
            "--pid",
            "--uts",
            "--mount",
            sys.executable,
            "-m",
            "flowsubmit.cli",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        check=False,
    )


def _claimed(daemon: Daemon, recovered: bool = False) -> set[str]:
    return {
        line["job_id"]
        for line in daemon.events("job.claimed")
        if bool(line.get("recovered")) is recovered
    }


class _Driver:
    """Completes the never-served deployment's runs of ``tag`` as they appear, in a thread."""

    def __init__(self, server: LocalServer, tag: str) -> None:
        self._tag, self._server = tag, server
        self._done: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> _Driver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            fresh = [str(r.id) for r in server_runs(self._tag, self._server)]
            fresh = [r for r in fresh if r not in self._done]
            asyncio.run(drive(fresh, concurrency=4, direct=True))
            self._done.update(fresh)


@pytest.mark.parametrize(
    "hosts",
    [("ns-a", "ns-b"), (None, None)],
    ids=["own-hostnames", "shared-hostname"],
)
def test_two_namespaces_share_a_queue_and_the_survivor_adopts_the_dead_ones_jobs(
    hosts: tuple[str | None, str | None],
    served: LocalServer,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """30 jobs split between two pid-1 daemons ``a`` and ``b``; ``a`` is killed with jobs in
    hand; ``b`` adopts them: every job ends once, every run exists once. Each keeps a
    heartbeat of its own, and ``health`` in ``b``'s namespace answers for ``b``, also when
    both share the node's hostname."""
    queue_dir = tmp_path / "queue"
    Queue(queue_dir).ensure()
    tag = f"hosts-{uuid.uuid4().hex[:8]}"
    env = served.env()
    a = _host_daemon(tmp_path, "a", hosts[0], queue_dir, env)
    b = _host_daemon(tmp_path, "b", hosts[1], queue_dir, env)
    try:
        a.wait_for_event("service.ready")
        b.wait_for_event("service.ready")
        queue = Queue(queue_dir)
        ids = [f"{tag}-{i:02d}" for i in range(JOBS)]
        for job_id in ids:
            document = jobs.make_job(deployment=DRIVEN, id=job_id, runs=RUNS_PER_JOB, tags=[tag])
            queue.enqueue(json.dumps(document).encode(), job_id)
        a.wait_for(lambda: len(_claimed(a) | _claimed(b)) == JOBS, what="every job claimed")
        a.wait_for(lambda: a.events("run.submitted"), what="a submitting")
        held_by_a = _claimed(a)
        namespaces = [os.stat(f"/proc/{_pid1(d)}/ns/pid").st_ino for d in (a, b)]
        names = [host or socket.gethostname() for host in hosts]
        expected = [f"heartbeat-{n}-{ns}-1.json" for n, ns in zip(names, namespaces, strict=True)]
        assert sorted(p.name for p in queue_dir.glob("heartbeat-*.json")) == sorted(expected)
        health = _in_namespace(b, "health", "--queue", str(queue_dir))
        assert health.returncode == 0, health.stdout + health.stderr

        killed_at = time.monotonic()
        os.kill(_pid1(a), signal.SIGKILL)  # the namespace's pid 1: the whole "container" goes
        a.process.wait(30)
        b.wait_for(lambda: _claimed(b, recovered=True) >= held_by_a, what="b adopting")
        adoption_s = time.monotonic() - killed_at
        record_property("adoption_s", round(adoption_s, 2))
        health = _in_namespace(b, "health", "--queue", str(queue_dir))  # a's beat is not b's
        assert (health.returncode, health.stdout[:22]) == (0, "ok: pid 1 passed its l")
        if hosts[0] is None:  # the node itself sees the live peer by its fresh beat
            ok, line = heartbeat_health(queue_dir)
            assert ok, line
        print(
            f"\na held {len(held_by_a)} of {JOBS} jobs; b adopted them {adoption_s:.2f} s after the kill"
        )

        with _Driver(served, tag):
            results = b.wait_for(
                lambda: (found := [result_of(queue_dir, i) for i in ids]) and all(found) and found,
                timeout_s=180,
                what="every result",
            )
        os.kill(_pid1(b), signal.SIGTERM)  # unshare passes no signal on to its child
        assert b.process.wait(60) == 0
    finally:
        for daemon in (a, b):
            if daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait()

    assert held_by_a and held_by_a != set(ids)  # both hosts had jobs
    assert [folder for folder, _ in results] == ["done"] * JOBS
    on_server = server_runs(tag, served)
    assert len(on_server) == JOBS * RUNS_PER_JOB  # none lost, none created twice
    per_job = {i: len(server_runs(job_tag(i), served)) for i in held_by_a}
    assert set(per_job.values()) == {RUNS_PER_JOB}
    assert {r.state_type.value for r in on_server} == {"COMPLETED"}  # type: ignore[union-attr]
