"""Whether the queue's filesystem can lock files for every daemon that shares it.

A claim is exclusive only while ``flock`` is: on one host it is the kernel's; on a
shared filesystem it must reach the server (NFSv4, or NFSv3 with its lock manager).
Two ways it fails, neither of which means "another daemon holds the job":

- the lock call itself fails (``ENOLCK``: no lock manager or no locks left,
  ``ENOSYS``/``EOPNOTSUPP``: the filesystem has no locks, ``EIO``: the server lost
  them);
- an NFS mount keeps locks local to each client (``nolock``, ``local_lock=flock`` or
  ``local_lock=all``): every lock succeeds, and two hosts could both claim one job.

Both raise ``LocksUnavailable``, which stops the daemon's claims with one error naming
the filesystem.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from flowsubmit.errors import LocksUnavailable

__all__ = ["NO_LOCKS", "Mount", "check_mount", "lock_failure", "mount_of"]

#: ``flock`` errors that say the filesystem cannot lock, not that the lock is held.
NO_LOCKS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EIO})
#: NFS mount options under which locks never leave the client.
_LOCAL_LOCKS = frozenset({"nolock", "local_lock=flock", "local_lock=all"})
_NEED = (
    "a shared queue needs locks every host sees: NFSv4 (or NFSv3 with lockd), not mounted nolock"
)


@dataclass(frozen=True)
class Mount:
    """The mount a path lives on: where, what filesystem, with which options."""

    point: str
    fstype: str
    options: frozenset[str]

    def __str__(self) -> str:
        return f"{self.fstype} at {self.point}"


def mount_of(path: Path, mountinfo: str | None = None) -> Mount | None:
    """The mount holding ``path`` (the longest mount point above it) in ``/proc/self/mountinfo``."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return None
    target = os.path.realpath(path)
    best: Mount | None = None
    for line in mountinfo.splitlines():
        mount = _parse(line)
        if mount is None or not _under(target, mount.point):
            continue
        if best is None or len(mount.point) >= len(best.point):
            best = mount
    return best


def check_mount(path: Path, mountinfo: str | None = None) -> None:
    """Refuse a queue on an NFS mount whose locks stay on each client.

    Raises:
        LocksUnavailable: ``path`` is on such a mount.
    """
    mount = mount_of(path, mountinfo)
    if mount is None or not mount.fstype.startswith("nfs"):
        return
    local = sorted(mount.options & _LOCAL_LOCKS)
    if local:
        raise LocksUnavailable(
            f"{path}: the queue is on {mount}, mounted {','.join(local)}: its locks stay on "
            f"this host, so daemons on other hosts could claim the same job; {_NEED}"
        )


def lock_failure(path: Path, exc: OSError) -> LocksUnavailable | None:
    """The error to stop claims with when ``flock`` on ``path`` failed with ``exc``; None when
    ``exc`` says nothing about the filesystem's locks (the caller raises it as it is)."""
    if exc.errno not in NO_LOCKS:
        return None
    mount = mount_of(path)
    where = str(mount) if mount else "its filesystem"
    name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
    return LocksUnavailable(
        f"{path.parent}: cannot lock files on {where} ({name}: {exc.strerror}); "
        f"no job is claimed: {_NEED}"
    )


def _parse(line: str) -> Mount | None:
    """One line of mountinfo: ``ID PARENT MAJ:MIN ROOT POINT OPTS [TAGS...] - FSTYPE SOURCE SUPER``."""
    head, sep, tail = line.partition(" - ")
    fields, rest = head.split(), tail.split()
    if not sep or len(fields) < 6 or len(rest) < 3:
        return None
    options = {*fields[5].split(","), *rest[2].split(",")}
    return Mount(_unescape(fields[4]), rest[0], frozenset(options))


def _unescape(point: str) -> str:
    """Mount points escape space, tab, newline and backslash as octal (``\\040``)."""
    for code in ("040", "011", "012", "134"):
        point = point.replace(f"\\{code}", chr(int(code, 8)))
    return point


def _under(path: str, point: str) -> bool:
    return path == point or path.startswith(point.rstrip("/") + "/")
