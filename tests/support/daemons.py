"""``flowsubmit run`` as a test subprocess: starting it with settings, reading its JSON log, and the queue's producer side."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowsubmit.queue.folders import Queue
from tests.support import ROOT

__all__ = [
    "FAST",
    "Daemon",
    "daemons_in",
    "enqueue",
    "ready_daemons",
    "result_of",
    "settings_env",
    "spawn_daemon",
    "status",
]

#: The settings every test daemon starts with unless a test names its own: quick polls and rescans.
FAST: dict[str, object] = {"poll_interval_s": 1, "rescan_interval_s": 0.5}


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


def settings_env(settings: Mapping[str, object]) -> dict[str, str]:
    """The ``FLOWSUBMIT_<NAME>`` variables that give a daemon ``settings``, each spelled as pydantic-settings reads it.

    Lists, dicts and booleans are JSON: pydantic-settings decodes a list or model field
    from JSON, and ``str(["a"])`` is not JSON. Strings, paths and numbers are their plain
    text: a string field would keep JSON's quotes, and the hidden ``test_crash_at`` is read
    raw. ``None`` has no spelling (the settings read no null from the environment): leave
    the setting out instead.
    """
    return {
        f"FLOWSUBMIT_{name.upper()}": _env_value(name, value) for name, value in settings.items()
    }


def _env_value(name: str, value: object) -> str:
    if isinstance(value, bool | list | tuple | dict):
        return json.dumps(value)
    if isinstance(value, str | Path | int | float):
        return str(value)
    raise TypeError(f"setting {name}: {value!r} has no FLOWSUBMIT_* spelling")


def spawn_daemon(
    queue: Path, log_path: Path, env: dict[str, str], settings: Mapping[str, object]
) -> Daemon:
    """Start ``flowsubmit run`` on ``queue`` with ``env`` plus ``FLOWSUBMIT_<NAME>`` settings; do not wait."""
    env = {**env, **settings_env(settings)}
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


@contextmanager
def daemons_in(home: Path) -> Iterator[Callable[..., Daemon]]:
    """Factory: start ``flowsubmit run`` with ``env`` and ``FAST`` settings, logging into ``home``, not waiting.

    A daemon's queue is ``home/queue`` unless given; those still running at the end are killed.
    """
    daemons: list[Daemon] = []

    def start(env: dict[str, str], queue: Path | None = None, **settings: object) -> Daemon:
        log_path = home / f"daemon-{len(daemons)}.log"
        daemons.append(spawn_daemon(queue or home / "queue", log_path, env, {**FAST, **settings}))
        return daemons[-1]

    try:
        yield start
    finally:
        for daemon in daemons:
            if daemon.process.poll() is None:
                daemon.process.kill()
                daemon.process.wait()


def ready_daemons(spawn: Callable[..., Daemon], env: dict[str, str]) -> Callable[..., Daemon]:
    """A factory of daemons started by ``spawn`` with ``env``, each returned once it logged ``service.ready``."""

    def start(queue: Path | None = None, **settings: object) -> Daemon:
        daemon = spawn(env, queue, **settings)
        daemon.wait_for_event("service.ready")
        return daemon

    return start


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


def status(env: dict[str, str], queue: Path, *args: str) -> str:
    """``flowsubmit status --queue QUEUE ARGS...`` (a subprocess, as an operator runs it); its output."""
    done = subprocess.run(
        [sys.executable, "-m", "flowsubmit.cli", "status", "--queue", str(queue), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def result_of(queue: Path, job_id: str) -> tuple[str, dict[str, Any]] | None:
    """(folder, result) once the job is in ``done/`` or ``failed/``, else ``None``."""
    ended = Queue(queue).outcome(job_id)
    return ended if ended is not None and ended[0] != "rejected" else None
