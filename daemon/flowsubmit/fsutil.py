"""Crash-safe file primitives: write to a temp file, fsync, rename, fsync the folder."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["atomic_write", "fsync_dir", "unique_name"]


def fsync_dir(folder: Path) -> None:
    """Make a rename or a create inside ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o640) -> None:
    """Write ``data`` to ``path`` so that a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def unique_name(folder: Path, name: str) -> str:
    """``name`` if it is free in ``folder``, else ``name`` with a short random suffix before the extension."""
    if not (folder / name).exists():
        return name
    stem, dot, ext = name.partition(".")
    return f"{stem}-{secrets.token_hex(4)}{dot}{ext}"
