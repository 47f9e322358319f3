"""Crash-safe file primitives: write to a temp file, fsync, rename, fsync the folder."""

from __future__ import annotations

import errno
import os
import secrets
import stat
import struct
from collections.abc import Iterable
from pathlib import Path

__all__ = ["UnsafeFile", "atomic_write", "fsync_dir", "grant_read", "read_regular", "unique_name"]


class UnsafeFile(OSError):
    """A file refused before its bytes are trusted: not a regular file, several hard links, or too large.

    ``reason`` is a sentence for an error line or an error file.
    """

    def __init__(self, reason: str, *, too_large: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.too_large = too_large


def fsync_dir(folder: Path) -> None:
    """Make a rename or a create inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | Iterable[bytes], *, mode: int = 0o640) -> None:
    """Write ``data`` (bytes, or chunks written as they come) to ``path`` so that a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            if isinstance(data, bytes):
                fh.write(data)
            else:
                fh.writelines(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def unique_name(folder: Path, name: str) -> str:
    """``name`` if it is free in ``folder``, else ``name`` with a short random suffix before the extension."""
    if not os.path.lexists(folder / name):  # a dangling link takes the name too
        return name
    stem, dot, ext = name.partition(".")
    return f"{stem}-{secrets.token_hex(4)}{dot}{ext}"


def read_regular(
    path: Path, max_bytes: int, *, single_link: bool = True
) -> tuple[bytes, os.stat_result]:
    """Read ``path`` without following a link, blocking on a FIFO or reading past ``max_bytes``.

    ``O_NONBLOCK`` keeps a FIFO with no writer from blocking the open, and ``fstat``
    on the open descriptor refuses it, so nothing is judged by a name that could be
    swapped between a check and the read. The ``fstat`` is returned with the bytes:
    its owner and inode are those of exactly these bytes. Every read of a file a
    producer could have written goes through here, so a file grown after a check
    (a sparse gigabyte) costs at most ``max_bytes``.

    Raises:
        FileNotFoundError: it is gone.
        PermissionError: this process may not read it.
        UnsafeFile: a symbolic link, not a regular file, a file with other hard links
            (with ``single_link``), or larger than ``max_bytes``.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (FileNotFoundError, PermissionError):
        raise
    except OSError as exc:  # ELOOP: a symlink; ENXIO: a socket
        kind = "a symbolic link" if path.is_symlink() else "not a regular file"
        raise UnsafeFile(f"{kind}; only regular files are accepted") from exc
    try:
        st = os.fstat(fd)
        _refuse_unsafe(st, max_bytes, single_link)
        data = _read_at_most(fd, max_bytes)
    finally:
        os.close(fd)
    return data, st


def _refuse_unsafe(st: os.stat_result, max_bytes: int, single_link: bool) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(
            "not a regular file (a FIFO, device or directory); only regular files are accepted"
        )
    if single_link and st.st_nlink > 1:
        raise UnsafeFile("the file has other hard links; only files with one name are accepted")
    if st.st_size > max_bytes:
        raise UnsafeFile(
            f"the file is {st.st_size} bytes, more than max_job_bytes ({max_bytes})", too_large=True
        )


def _read_at_most(fd: int, max_bytes: int) -> bytes:
    """The file's bytes; a file that grew past ``max_bytes`` while it was read is refused."""
    chunks, total = [], 0
    while chunk := os.read(fd, max_bytes + 1 - total):
        chunks.append(chunk)
        total += len(chunk)
        if total > max_bytes:
            raise UnsafeFile(f"the file is larger than max_job_bytes ({max_bytes})", too_large=True)
    return b"".join(chunks)


#: POSIX access ACL as Linux stores it (``system.posix_acl_access``): a version, then
#: (tag, permissions, id) entries sorted by tag. No package the project uses writes it.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_NO_ID = 0xFFFFFFFF
_READ = 4


def grant_read(path: Path, uid: int) -> bool:
    """Let user ``uid`` read ``path`` through an ACL entry, keeping the file's mode for everyone else.

    This is how a producer reads the result of its own job and no other: the daemon owns
    the file and names the producer in it. False when the file system has no ACLs (the
    file stays readable by its mode only) or ``uid`` is this process's own user.
    """
    if uid == os.geteuid():
        return False
    mode = os.stat(path, follow_symlinks=False).st_mode
    entries = [
        (_ACL_USER_OBJ, (mode >> 6) & 7, _ACL_NO_ID),
        (_ACL_USER, _READ, uid),
        (_ACL_GROUP_OBJ, (mode >> 3) & 7, _ACL_NO_ID),
        (_ACL_MASK, ((mode >> 3) & 7) | _READ, _ACL_NO_ID),
        (_ACL_OTHER, mode & 7, _ACL_NO_ID),
    ]
    blob = struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)
    try:
        os.setxattr(path, _ACL_XATTR, blob, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return True
