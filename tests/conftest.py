"""Session fixtures: one real Prefect server on 127.0.0.1 (SQLite in a temp dir) and real served flows.

The environment is set before anything imports Prefect, whose settings are read at import.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from flowsubmit.local.localserver import LocalServer, free_port, prefect_env, served_flows
from flowsubmit.local.topology import Topology
from tests.support.daemons import Daemon, daemons_in, ready_daemons

_HOME = Path(tempfile.mkdtemp(prefix="flowsubmit-tests-"))
#: ``make test-compat``: the Python of another venv, whose (older) Prefect serves the tests.
_SERVER_PYTHON = os.environ.get("FLOWSUBMIT_TEST_SERVER_PYTHON")
_PORT = free_port()
os.environ.update(prefect_env(_HOME, f"http://127.0.0.1:{_PORT}/api"))
for _name in [n for n in os.environ if n.startswith("FLOWSUBMIT_")]:
    del os.environ[_name]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Remove this process's server home (its database, logs, topology) once every fixture is
    torn down; a failed session keeps it, with the served flows' log, for a look."""
    if exitstatus == 0:
        shutil.rmtree(_HOME, ignore_errors=True)
    else:
        print(f"\nkept for a look: {_HOME}")


@pytest.fixture(scope="session")
def prefect_server() -> Iterator[LocalServer]:
    """A real Prefect server for the whole session, stopped by PID at the end."""
    server = LocalServer(home=_HOME, port=_PORT, python=_SERVER_PYTHON)
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


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: start ``flowsubmit run`` with ``env`` (fast poll and rescan), not waiting; killed afterwards."""
    with daemons_in(tmp_path) as start:
        yield start


@pytest.fixture
def start_daemon(served: LocalServer, spawn: Callable[..., Daemon]) -> Callable[..., Daemon]:
    """Factory: ``flowsubmit run`` against the session server, on ``tmp_path/queue`` by default, once ready."""

    return ready_daemons(spawn, served.env())


@pytest.fixture(scope="module")
def start_module_daemon(
    served: LocalServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Daemon]]:
    """Factory: ``start_daemon`` for daemons a module's tests share, killed after the module's last test."""
    with daemons_in(tmp_path_factory.mktemp("daemons")) as spawn:
        yield ready_daemons(spawn, served.env())


@pytest.fixture
def start_prod_daemon(
    topology_served: Topology, spawn: Callable[..., Daemon]
) -> Callable[..., Daemon]:
    """Factory: ``flowsubmit run`` against replica A of the production topology, once ready."""
    return ready_daemons(spawn, topology_served.a.env())
