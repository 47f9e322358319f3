"""Retention: removing the files of finished and rejected jobs older than a cut-off (``flowsubmit prune``, ``retention_days``).

Only ``done/``, ``failed/`` and ``rejected/`` are ever touched; ``incoming/``,
``processing/`` and ``tmp/`` never are. A job's age is the time it ended: the
mtime of its ``JOB.result.json`` (or of ``NAME.error.json`` for a rejected file),
which is written when the job is finished, whereas the job file keeps the mtime
its producer gave it. That anchor file is removed last, so a prune cut short by a
crash is finished by the next one.

Only regular files are removed, judged by ``lstat`` (nothing is opened or followed).
Any other entry there (a directory, a FIFO, a socket, a symbolic link) is skipped and
logged as ``retention.skipped`` at every prune until someone removes it by hand: one
stray entry never stops the rest of the prune.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from flowsubmit._aio import wait_event
from flowsubmit.logs import get_logger

__all__ = ["Expired", "expired", "parse_age", "prune", "prune_periodically", "strays"]

log = get_logger("flowsubmit.retention")

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
#: How often the daemon applies ``retention_days``.
PERIOD_S = 3600.0
#: The folders retention works in; no other is ever touched.
_FOLDERS = ("done", "failed", "rejected")


def parse_age(text: str) -> float:
    """``7d``, ``12h``, ``30m``, ``90s`` or ``2w`` in seconds.

    Raises:
        ValueError: not such a duration.
    """
    match = _AGE.match(text)
    if match is None:
        raise ValueError(f"{text!r} is not a duration (use e.g. 7d, 12h, 30m, 90s, 2w)")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True, slots=True)
class Expired:
    """One finished or rejected job whose files are (or would be) removed."""

    folder: str
    name: str
    age_s: float
    files: tuple[Path, ...]


def expired(root: Path, older_than_s: float, *, now: float | None = None) -> list[Expired]:
    """The jobs of ``done/``, ``failed/`` and ``rejected/`` that ended more than ``older_than_s`` ago."""
    now = time.time() if now is None else now
    found: list[Expired] = []
    for folder, anchor_suffix in (("done", ".result.json"), ("failed", ".result.json")):
        found += _expired_in(root / folder, anchor_suffix, ".json", older_than_s, now)
    found += _expired_in(root / "rejected", ".error.json", "", older_than_s, now)
    return found


def _expired_in(
    folder: Path, anchor_suffix: str, job_suffix: str, older_than_s: float, now: float
) -> list[Expired]:
    found: list[Expired] = []
    if not folder.is_dir():
        return found
    for anchor in sorted(folder.glob(f"*{anchor_suffix}")):
        if anchor.name.startswith("."):
            continue  # a temporary file of an atomic write
        st = _lstat(anchor)
        if st is None or not stat.S_ISREG(st.st_mode) or now - st.st_mtime <= older_than_s:
            continue  # gone, young, or a stray entry under the name (see ``strays``)
        stem = anchor.name.removesuffix(anchor_suffix)  # JOB (done/failed) or NAME (rejected)
        job = folder / f"{stem}{job_suffix}"
        base = stem.removesuffix(".json")
        extras = [folder / f"{base}{s}" for s in (".journal", ".cancel")]
        files = [p for p in (job, *extras) if p != anchor and _is_regular(p)]
        found.append(Expired(folder.name, stem, now - st.st_mtime, (*files, anchor)))
    return found


def strays(root: Path) -> list[Path]:
    """The entries of ``done/``, ``failed/`` and ``rejected/`` that are not regular files (never removed)."""
    found: list[Path] = []
    for name in _FOLDERS:
        try:
            entries = sorted(os.scandir(root / name), key=lambda e: e.name)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            try:
                if not entry.is_file(follow_symlinks=False) and not entry.name.startswith("."):
                    found.append(Path(entry.path))
            except OSError:
                continue  # removed meanwhile
    return found


def prune(root: Path, older_than_s: float, *, dry_run: bool = False) -> list[Expired]:
    """Remove (unless ``dry_run``) the files of every job that ended more than ``older_than_s`` ago; log each.

    Entries that are not regular files are skipped, each logged as ``retention.skipped``.
    """
    for path in strays(root):
        log.warning(
            "retention.skipped",
            folder=path.parent.name,
            name=path.name,
            kind=_kind(path),
            dry_run=dry_run,
        )
    jobs = expired(root, older_than_s)
    for job in jobs:
        if not dry_run:
            for path in job.files:  # the anchor is last: see the module docstring
                path.unlink(missing_ok=True)
        log.info(
            "retention.removed",
            folder=job.folder,
            name=job.name,
            files=[p.name for p in job.files],
            age_days=round(job.age_s / 86400, 2),
            dry_run=dry_run,
        )
    return jobs


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return path.lstat()
    except FileNotFoundError:
        return None


def _is_regular(path: Path) -> bool:
    st = _lstat(path)
    return st is not None and stat.S_ISREG(st.st_mode)


def _kind(path: Path) -> str:
    """What a stray entry is, in a word for its log line."""
    st = _lstat(path)
    if st is None:
        return "gone"
    kinds = {
        stat.S_ISDIR: "directory",
        stat.S_ISLNK: "symbolic link",
        stat.S_ISFIFO: "fifo",
        stat.S_ISSOCK: "socket",
    }
    return next((kind for test, kind in kinds.items() if test(st.st_mode)), "device")


async def prune_periodically(root: Path, retention_days: float, stop: asyncio.Event) -> None:
    """Apply ``retention_days`` now and every ``PERIOD_S`` until ``stop`` is set (the daemon's task)."""
    while not stop.is_set():
        try:
            prune(root, retention_days * 86400)
        except OSError as exc:  # a folder the daemon may not write: say so, try again later
            log.warning("retention.failed", error=str(exc))
        await wait_event(stop, PERIOD_S)
