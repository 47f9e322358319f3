"""Per-job locks (``JobLock``), and whether the queue's filesystem can lock files for every daemon that shares it.

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
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from flowsubmit.errors import ClaimLost, LocksUnavailable

__all__ = ["NO_LOCKS", "JobLock", "Mount", "check_mount", "lock_failure", "mount_of"]

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


class JobLock:
    """An exclusive ``flock`` on ``processing/JOB.lock``, held for as long as the job is owned.

    The lock file is unlinked on release; an acquirer that locked a file which was
    unlinked meanwhile notices (inode check) and reports the lock as lost.
    """

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @classmethod
    def acquire(cls, path: Path) -> Self:
        """Take the lock without waiting.

        Raises:
            ClaimLost: another live process holds it.
            LocksUnavailable: the filesystem cannot lock (``queue.locking``), which is not "held".
        """
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino != os.stat(path, follow_symlinks=False).st_ino:
                raise ClaimLost(f"{path.name} was released while we locked it")
        except (BlockingIOError, FileNotFoundError, ClaimLost) as exc:
            os.close(fd)
            raise ClaimLost(f"{path.name} is held by another process") from exc
        except OSError as exc:
            os.close(fd)
            broken = lock_failure(path, exc)
            if broken is None:
                raise
            raise broken from exc
        return cls(path, fd)

    @staticmethod
    def held(path: Path) -> bool | None:
        """True while a live process holds the lock at ``path``; never creates nor removes it.

        A shared, non-blocking try: it fails only against an owner's exclusive lock. (An
        owner acquiring at this very moment fails once and tries again at its next scan.)
        None when this user may not open the lock: lock files are the daemon's alone,
        because a producer holding a shared lock on one would keep a dead daemon's job
        from being adopted.
        """
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except PermissionError:
            return None
        except OSError:
            return False  # no lock file: nobody owns the job
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno in NO_LOCKS:
                return None  # the filesystem cannot say
            raise
        finally:
            os.close(fd)  # closing drops a lock we took
        return False

    def release(self) -> None:
        """Unlink and unlock; idempotent."""
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self._fd)
        self._fd = None
