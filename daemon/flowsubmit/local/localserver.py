"""A throwaway local Prefect server and served flows, for the demo, the tests and the benchmarks."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path

__all__ = [
    "LocalServer",
    "free_port",
    "prefect_env",
    "served_flows",
    "start_prefect",
    "stop_process",
]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prefect_env(
    home: Path, api_url: str | None = None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of a Prefect process isolated in ``home``: loopback, no telemetry, no UI."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_PROFILES_PATH=str(home / "profiles.toml"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false",
        PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED="false",
        PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED="false",
        PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY="false",
        PREFECT_LOGGING_TO_API_ENABLED="false",
        PREFECT_RUNNER_POLL_FREQUENCY="1",
        DO_NOT_TRACK="1",
    )
    if api_url:
        env["PREFECT_API_URL"] = api_url
    env.update(extra or {})
    return env


class LocalServer:
    """Owns one ``prefect server start`` process on 127.0.0.1 with SQLite in ``home``.

    ``stop()`` and ``start()`` may be called again to restart it on the same port
    and database (to test outages). ``server_env`` overrides the server's settings
    (another database, a message broker), ``client_env`` adds to every client's
    (credentials), and ``services=False`` starts the API alone (``--no-services``):
    that is how ``flowsubmit.local.topology`` builds its replicas. ``python`` is the
    interpreter whose Prefect serves (and runs ``served_flows``): another venv's, to
    test against an older server; this process's by default.
    """

    def __init__(
        self,
        home: Path | None = None,
        port: int | None = None,
        log_file: Path | None = None,
        *,
        server_env: Mapping[str, str] | None = None,
        client_env: Mapping[str, str] | None = None,
        services: bool = True,
        python: str | None = None,
    ) -> None:
        self.python = python or sys.executable
        self._tmp = None if home else tempfile.TemporaryDirectory(prefix="flowsubmit-prefect-")
        self.home = home or Path(self._tmp.name)  # type: ignore[union-attr]
        self.port = port or free_port()
        self.log_file = log_file or self.home / "server.log"
        self.server_env = dict(server_env or {})
        self.client_env = dict(client_env or {})
        self.services = services
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        """``http://127.0.0.1:PORT/api``."""
        return f"http://127.0.0.1:{self.port}/api"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a client process of this server (with its credentials, if any)."""
        return prefect_env(self.home, self.api_url, {**self.client_env, **extra})

    def start(self, timeout_s: float = 90.0) -> None:
        """Start the server and wait until it answers its health check."""
        env = prefect_env(
            self.home,
            extra={
                "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{self.home / 'prefect.db'}",
                **self.server_env,
            },
        )
        args = ["server", "start", "--host", "127.0.0.1", "--port", str(self.port), "--no-ui"]
        if not self.services:
            args.append("--no-services")
        self.process = start_prefect(args, env, self.log_file, python=self.python)
        try:
            self._wait_healthy(timeout_s)
        except BaseException:  # a server too slow to start is stopped, not left running
            self.stop()
            raise

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"prefect server exited with {self.process.returncode}; see {self.log_file}"
                )
            with (
                contextlib.suppress(OSError, urllib.error.URLError),
                urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response,
            ):
                if response.status == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"prefect server not healthy after {timeout_s}s; see {self.log_file}")

    def stop(self) -> None:
        """Stop the server process group (SIGTERM, then SIGKILL)."""
        stop_process(self.process)
        self.process = None

    def close(self) -> None:
        """Stop and remove the temporary home."""
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> LocalServer:
        try:
            self.start()
        except BaseException:  # Ctrl-C while starting: leave no server behind
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def served_flows(
    server: LocalServer, module: str, *, log_file: Path | None = None, ready_timeout_s: float = 90.0
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m module`` (which calls ``serve``) against ``server``; stop it on exit.

    The module must write ``READY`` to ``$FLOWSUBMIT_READY_FILE`` once its deployments exist.
    """
    ready = server.home / f"ready-{os.getpid()}-{time.monotonic_ns()}"
    log_path = log_file or server.home / "served.log"
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            [server.python, "-m", module],
            env=server.env(FLOWSUBMIT_READY_FILE=str(ready)),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + ready_timeout_s
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"served flows ({module}) did not become ready; see {log_path}")
            time.sleep(0.1)
        yield process
    finally:
        stop_process(process)


def start_prefect(
    args: list[str], env: Mapping[str, str], log_file: Path, *, python: str | None = None
) -> subprocess.Popen[bytes]:
    """Start ``prefect ARGS`` in a session of its own (so ``stop_process`` ends its children too)."""
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            [python or sys.executable, "-m", "prefect", *args],
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop_process(process: subprocess.Popen[bytes] | None, timeout_s: float = 10.0) -> None:
    """Stop a process started by ``start_prefect`` and its group (SIGTERM, then SIGKILL)."""
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
