"""The backlog's age: how long the oldest job file of a queue folder has waited.

Owns ``flowsubmit_queue_oldest_age_seconds``'s reading; the age is taken from the file's
mtime, which ``enqueue`` sets when it writes the file (a rename into ``incoming/`` keeps it).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from flowsubmit.queue.folders import job_files

__all__ = ["oldest_age_s"]


def oldest_age_s(folder: Path) -> float:
    """Seconds since the oldest job file of ``folder`` was written, 0 when it has none.

    A file that goes away between the listing and its stat (claimed meanwhile) is skipped.
    """
    mtimes: list[float] = []
    for path in job_files(folder):
        with contextlib.suppress(FileNotFoundError):
            mtimes.append(path.stat().st_mtime)
    return max(time.time() - min(mtimes), 0.0) if mtimes else 0.0
