"""The daemon's heartbeat file in the queue, and the health verdict read from it (``flowsubmit health``, ``/healthz``).

Each daemon keeps ``DIR/heartbeat-HOST-PIDNS-PID.json``, rewritten atomically at most
once a second from its loop, so a health check needs no port: it works inside a
container with only the queue volume. A daemon is one instance by its host, its PID
namespace (the inode of ``/proc/self/ns/pid``) and its pid: containers that share a
hostname (``--network host``) each run their daemon as pid 1, in PID namespaces of
their own. A host sees its own daemons only, and ``health`` judges the daemons of its
own PID namespace when there are any (the container it runs in), so a healthy peer
elsewhere never hides a dead daemon here. A pid is checked by ``kill 0`` only in its
own PID namespace; a daemon in another is alive while its beat is fresh.

A heartbeat file is trusted by more than its name: whoever may write the queue root
could forge one (``{"pid": 1}`` would read as a live daemon forever). A file counts
only when it is a regular file owned by the daemon's user (the owner of
``processing/``, which the daemon creates), named after the host, PID namespace and
pid it states, and well-formed field by field; any other is ignored, and never deleted.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from flowsubmit.queue.folders import safe_name
from flowsubmit.queue.fsutil import UnsafeFile, atomic_write, read_regular

__all__ = ["Beat", "Beats", "Heartbeat", "health", "pid_namespace", "read", "scan"]

_PREFIX = "heartbeat-"
#: A beat is rewritten at most this often, unless what it says changed.
_MIN_PERIOD_S = 1.0
#: Slack added to the loop's promised period before a beat counts as stale (a long scan, a busy host).
_GRACE_S = 10.0
#: A heartbeat file is a few hundred bytes; a larger one is not the daemon's.
_MAX_BEAT_BYTES = 64 * 1024
#: The largest time or duration a well-formed beat states (year 5138): a clock must print it.
_MAX_TIME = 1e11


@dataclass(frozen=True, slots=True)
class Beat:
    """What one daemon last said of itself (the content of its heartbeat file)."""

    pid: int
    host: str
    #: The inode of the daemon's PID namespace (``/proc/self/ns/pid``); 0 without ``/proc``.
    pid_ns: int
    queue: str
    version: str
    #: Unix time of the loop's last pass.
    time: float
    #: Older than this many seconds, the beat is stale (the loop is wedged or gone).
    stale_after_s: float
    tracker: str | None
    prefect_reachable: bool
    #: Unix time since which Prefect has not answered, or None while it answers.
    prefect_unreachable_since: float | None = None

    def problem(self, now: float) -> str | None:
        """Why this daemon is not healthy at ``now``, or None when it is."""
        age_s = now - self.time
        if age_s > self.stale_after_s:
            return f"stale for {age_s:.0f} s: pid {self.pid} last passed its loop at {_clock(self.time)}"
        if not self.prefect_reachable:
            since = self.prefect_unreachable_since or self.time
            return f"Prefect unreachable for {now - since:.0f} s (pid {self.pid})"
        return None

    def summary(self, now: float) -> str:
        """One line for a healthy daemon."""
        return (
            f"ok: pid {self.pid} passed its loop {now - self.time:.1f} s ago, "
            f"tracker {self.tracker or 'starting'}, Prefect reachable"
        )


class Heartbeat:
    """Owns this process's heartbeat file in one queue: writes it, and removes it on a clean stop."""

    def __init__(self, root: Path, *, version: str) -> None:
        self.host = socket.gethostname()
        self.pid_ns = pid_namespace()
        self.path = _path(root, self.host, self.pid_ns, os.getpid())
        self._root = root
        self._version = version
        self._written_at = 0.0
        self._said: tuple[object, ...] = ()
        #: The last beat, also answered by ``/healthz``; None before the first.
        self.last: Beat | None = None
        #: When the last beat was, on the monotonic clock (the systemd watchdog's reference).
        self._beaten_at = time.monotonic()

    def beat(self, *, every_s: float, tracker: str | None, prefect_down_s: float | None) -> None:
        """Record one pass of the loop, which promises the next within ``every_s``."""
        now = time.time()
        self._beaten_at = time.monotonic()
        first = self.last is None
        self.last = Beat(
            pid=os.getpid(),
            host=self.host,
            pid_ns=self.pid_ns,
            queue=str(self._root),
            version=self._version,
            time=now,
            stale_after_s=round(2 * every_s + _GRACE_S, 1),
            tracker=tracker,
            prefect_reachable=prefect_down_s is None,
            prefect_unreachable_since=None if prefect_down_s is None else now - prefect_down_s,
        )
        if first:
            self._remove_dead()
        said = (tracker, prefect_down_s is None, every_s)
        if said != self._said or now - self._written_at >= _MIN_PERIOD_S:
            atomic_write(self.path, (json.dumps(asdict(self.last)) + "\n").encode())
            self._written_at, self._said = now, said

    def beaten_at(self) -> float:
        """When the loop last passed (``beat``), on the monotonic clock; this object's creation before."""
        return self._beaten_at

    def _remove_dead(self) -> None:
        """Delete the files this PID namespace's dead daemons left (a kill -9); a file not trusted is never touched.

        Only a pid of this namespace can be known dead: another namespace's stale beat may
        be a wedged daemon, and stays.
        """
        for beat in read(self._root, self.host):
            if beat.pid_ns == self.pid_ns and beat.pid != os.getpid() and not _alive(beat.pid):
                _path(self._root, beat.host, beat.pid_ns, beat.pid).unlink(missing_ok=True)

    def problem(self) -> str | None:
        """The health answer of this process right now (``/healthz``)."""
        if self.last is None:
            return "starting: the loop has not passed yet"
        return self.last.problem(time.time())

    def remove(self) -> None:
        """Delete the file (a clean stop: no daemon serves the queue any more)."""
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class Beats:
    """The heartbeat files of one host in a queue: the trusted beats, and how many files were ignored."""

    trusted: list[Beat] = field(default_factory=list)
    #: Files named like a heartbeat but not trusted: not the daemon's user's, not a
    #: regular file, malformed, or not named after the host, PID namespace and pid they state.
    untrusted: int = 0


def scan(root: Path, host: str | None = None) -> Beats:
    """The beats of ``host``'s daemons (this host by default) in the queue at ``root``, and the files ignored.

    A file removed meanwhile, or one this process may not read, is neither: it says
    nothing about anyone. Without ``processing/`` there is no daemon's user to trust.
    """
    host = host or socket.gethostname()
    prefix = f"{_PREFIX}{safe_name(host)}-"
    try:
        owner = os.stat(root / "processing", follow_symlinks=False).st_uid
    except OSError:
        owner = None
    trusted: list[Beat] = []
    untrusted = 0
    for path in sorted(root.glob(f"{prefix}*.json")):
        try:
            beat = _trusted_beat(root, path, owner)
        except (FileNotFoundError, PermissionError):
            continue
        if beat is None:
            untrusted += 1
        elif safe_name(beat.host) == safe_name(host):
            trusted.append(beat)  # else another host's, whose name starts like ours
    return Beats(trusted, untrusted)


def read(root: Path, host: str | None = None) -> list[Beat]:
    """The trusted beats of ``host``'s daemons (this host by default) in the queue at ``root``."""
    return scan(root, host).trusted


def _trusted_beat(root: Path, path: Path, owner: int | None) -> Beat | None:
    """The beat in ``path`` if the file is trusted (see the module docstring), else None."""
    try:
        data, st = read_regular(path, _MAX_BEAT_BYTES)
    except UnsafeFile:
        return None
    if owner is None or st.st_uid != owner:
        return None
    try:
        beat = _parse_beat(json.loads(data))
    except ValueError:
        return None
    if beat is None or _path(root, beat.host, beat.pid_ns, beat.pid) != path:
        return None
    return beat


def _parse_beat(document: Any) -> Beat | None:
    """A ``Beat`` from a heartbeat file's JSON, each field checked for its type; None when one is wrong."""
    if not isinstance(document, dict):
        return None
    get = document.get
    pid, pid_ns, since = get("pid"), get("pid_ns"), get("prefect_unreachable_since")
    texts = [get(k) for k in ("host", "queue", "version")]
    numbers = [get(k) for k in ("time", "stale_after_s")]
    if (
        not (type(pid) is int and pid > 0)
        or not (type(pid_ns) is int and pid_ns >= 0)
        or not all(isinstance(t, str) for t in texts)
        or not all(_is_number(n) for n in numbers)
        or not (get("tracker") is None or isinstance(get("tracker"), str))
        or not isinstance(get("prefect_reachable"), bool)
        or not (since is None or _is_number(since))
    ):
        return None
    return Beat(
        pid=pid,
        host=document["host"],
        pid_ns=pid_ns,
        queue=document["queue"],
        version=document["version"],
        time=float(document["time"]),
        stale_after_s=float(document["stale_after_s"]),
        tracker=document["tracker"],
        prefect_reachable=document["prefect_reachable"],
        prefect_unreachable_since=None if since is None else float(since),
    )


def _is_number(value: Any) -> bool:
    """A JSON number a clock or a duration can hold: not a bool, finite, from 0 to ``_MAX_TIME``."""
    return type(value) in (int, float) and math.isfinite(value) and 0 <= value <= _MAX_TIME


def health(root: Path) -> tuple[bool, str]:
    """(healthy, one line why) for the queue at ``root``, judged from this host's trusted heartbeat files."""
    now = time.time()
    beats = scan(root)
    healthy, line = _verdict(root, beats.trusted, now)
    if beats.untrusted:
        files = "file" if beats.untrusted == 1 else "files"
        line += f" (ignored {beats.untrusted} untrusted heartbeat {files})"
    return healthy, line


def _verdict(root: Path, beats: list[Beat], now: float) -> tuple[bool, str]:
    own = pid_namespace()
    if any(b.pid_ns == own for b in beats):
        beats = [b for b in beats if b.pid_ns == own]
    alive = [b for b in beats if _beat_alive(b, own, now)]
    if not alive:
        if beats:
            last = max(beats, key=lambda b: b.time)
            return False, (
                f"no daemon serves {root}: pid {last.pid} is gone "
                f"(last loop pass {now - last.time:.0f} s ago)"
            )
        return False, f"no daemon serves {root} (no heartbeat file from this host)"
    problems = [(b, b.problem(now)) for b in alive]
    for beat, problem in problems:
        if problem is None:
            return True, beat.summary(now)
    return False, str(problems[0][1])


def _path(root: Path, host: str, pid_ns: int, pid: int) -> Path:
    return root / f"{_PREFIX}{safe_name(host)}-{pid_ns}-{pid}.json"


def pid_namespace() -> int:
    """The inode of this process's PID namespace, which tells containers apart; 0 without ``/proc``."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _beat_alive(beat: Beat, own_ns: int, now: float) -> bool:
    """Whether the daemon of ``beat`` lives: by its pid in this PID namespace, by the beat's freshness in another."""
    if beat.pid_ns == own_ns:
        return _alive(beat.pid)
    return now - beat.time <= beat.stale_after_s


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, under another user
    return True


def _clock(unix: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(unix))
