"""Session fixtures: one real Prefect server on 127.0.0.1 (SQLite in a temp dir) and real served flows.

The environment is set before anything imports Prefect, whose settings are read at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from flowsubmit.local.localserver import LocalServer, free_port, prefect_env, served_flows
from flowsubmit.local.topology import Topology
from flowsubmit.queue.folders import Queue

_HOME = Path(tempfile.mkdtemp(prefix="flowsubmit-tests-"))
_PORT = free_port()
os.environ.update(prefect_env(_HOME, f"http://127.0.0.1:{_PORT}/api"))
for _name in [n for n in os.environ if n.startswith("FLOWSUBMIT_")]:
    del os.environ[_name]

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[LocalServer]:
    """A real Prefect server for the whole session, stopped by PID at the end."""
    server = LocalServer(home=_HOME, port=_PORT)
    try:
        # In the try: a start that times out must not leave the server running; 240 s, as a
        # loaded two-core machine has taken over 90 s to answer.
        server.start(timeout_s=240)
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def served(prefect_server: LocalServer) -> Iterator[LocalServer]:
    """The test flows of ``tests/support/flows.py``, served by ``flow.serve`` in a subprocess."""
    with served_flows(prefect_server, "tests.support.flows", log_file=_HOME / "served.log"):
        yield prefect_server


@pytest.fixture(scope="session")
def topology() -> Iterator[Topology]:
    """Prefect's production topology for the session (PostgreSQL, Redis, two API replicas, auth); removed at the end."""
    with Topology(home=_HOME / "topology") as topo:
        yield topo


@pytest.fixture(scope="session")
def topology_served(topology: Topology) -> Iterator[Topology]:
    """The test flows served by ``flow.serve`` through replica B, so their states reach A only via Redis."""
    with served_flows(topology.b, "tests.support.flows", log_file=topology.home / "served.log"):
        yield topology


@dataclass
class Daemon:
    """A ``flowsubmit run`` subprocess and its JSON log."""

    queue: Path
    process: subprocess.Popen[bytes]
    log_path: Path
    stopped: bool = field(default=False)

    def lines(self) -> list[dict[str, Any]]:
        """Every stdout line, parsed as JSON (a line that is not JSON fails the test)."""
        text = self.log_path.read_text()
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def events(self, name: str) -> list[dict[str, Any]]:
        """Log lines whose ``event`` is ``name``."""
        return [line for line in self.lines() if line.get("event") == name]

    def wait_for(
        self, predicate: Callable[[], Any], timeout_s: float = 90.0, what: str = "condition"
    ) -> Any:
        """Poll ``predicate`` until it returns something truthy; fail on timeout or daemon exit."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            if self.process.poll() is not None:
                raise AssertionError(
                    f"daemon exited with {self.process.returncode} waiting for {what}:\n{self.log_path.read_text()[-4000:]}"
                )
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.log_path.read_text()[-4000:]}")

    def wait_for_event(
        self, name: str, count: int = 1, timeout_s: float = 90.0
    ) -> list[dict[str, Any]]:
        """Wait until ``count`` lines with event ``name`` were logged."""
        return self.wait_for(
            lambda: (found := self.events(name)) and len(found) >= count and found, timeout_s, name
        )  # type: ignore[no-any-return]

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait, and return the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout_s)
        self.stopped = True
        return self.process.returncode


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: start ``flowsubmit run`` with ``env`` (fast poll and rescan), not waiting; killed afterwards."""
    daemons: list[Daemon] = []

    def start(env: dict[str, str], queue: Path | None = None, **settings: object) -> Daemon:
        log_path = tmp_path / f"daemon-{len(daemons)}.log"
        fast = {"poll_interval_s": 1, "rescan_interval_s": 0.5, **settings}
        daemons.append(spawn_daemon(queue or tmp_path / "queue", log_path, env, fast))
        return daemons[-1]

    yield start
    for daemon in daemons:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()


@pytest.fixture
def start_daemon(served: LocalServer, spawn: Callable[..., Daemon]) -> Callable[..., Daemon]:
    """Factory: ``flowsubmit run`` against the session server, on ``tmp_path/queue`` by default, once ready."""

    return ready_daemons(spawn, served.env())


@pytest.fixture
def start_prod_daemon(
    topology_served: Topology, spawn: Callable[..., Daemon]
) -> Callable[..., Daemon]:
    """Factory: ``flowsubmit run`` against replica A of the production topology, once ready."""
    return ready_daemons(spawn, topology_served.a.env())


def ready_daemons(spawn: Callable[..., Daemon], env: dict[str, str]) -> Callable[..., Daemon]:
    """A factory of daemons started by ``spawn`` with ``env``, each returned once it logged ``service.ready``."""

    def start(queue: Path | None = None, **settings: object) -> Daemon:
        daemon = spawn(env, queue, **settings)
        daemon.wait_for_event("service.ready")
        return daemon

    return start


def spawn_daemon(
    queue: Path, log_path: Path, env: dict[str, str], settings: dict[str, Any]
) -> Daemon:
    """Start ``flowsubmit run`` on ``queue`` with ``env`` plus ``FLOWSUBMIT_<NAME>`` settings; do not wait."""
    env = {**env, **{f"FLOWSUBMIT_{k.upper()}": str(v) for k, v in settings.items()}}
    with open(log_path, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flowsubmit.cli", "run", "--queue", str(queue)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
        )
    return Daemon(queue, process, log_path)


def enqueue(queue: Path, job: dict[str, Any] | bytes, *, env: dict[str, str] | None = None) -> str:
    """``flowsubmit enqueue`` a job (as a subprocess, the way producers do); return its id."""
    data = job if isinstance(job, bytes) else json.dumps(job).encode()
    done = subprocess.run(
        [sys.executable, "-m", "flowsubmit.cli", "enqueue", "--create", "--queue", str(queue), "-"],
        input=data,
        capture_output=True,
        check=True,
        cwd=ROOT,
        env=env,
    )
    return done.stdout.decode().strip()


def result_of(queue: Path, job_id: str) -> tuple[str, dict[str, Any]] | None:
    """(folder, result) once the job is in ``done/`` or ``failed/``, else ``None``."""
    ended = Queue(queue).outcome(job_id)
    return ended if ended is not None and ended[0] != "rejected" else None
