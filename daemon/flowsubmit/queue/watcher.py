"""Watches ``incoming/``: inotify events as hints, and a full rescan on every timeout."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

from watchfiles import Change, awatch
from watchfiles._rust_notify import WatchfilesRustInternalError

from flowsubmit._aio import wait_event
from flowsubmit.logs import get_logger
from flowsubmit.queue.folders import is_job_name

__all__ = ["job_file_changed", "wakeups"]

log = get_logger("flowsubmit.watcher")

#: How often watchfiles' watcher thread wakes to look for file events (and at the stop
#: event): a job dropped is seen within two steps (one to notice, one to see the burst
#: of events over). Each wake takes the GIL: at 10 ms, the idle daemon spent about
#: 0.45 % of a core here alone.
WATCH_STEP_MS = 100


def job_file_changed(change: Change, path: str) -> bool:
    """True for events on files the queue would scan (the queue's own rule, ``is_job_name``)."""
    return is_job_name(os.path.basename(path))


async def wakeups(
    folder: Path, *, stop: asyncio.Event, rescan_interval_s: float, force_polling: bool = False
) -> AsyncIterator[None]:
    """Yield once at start, then on every batch of file events and every ``rescan_interval_s``.

    Each yield means "scan the folder now": events are only hints (NFS and bind mounts
    give none), the scan and the rename claim are the truth. Ends when ``stop`` is set.

    The watcher fails on a file name that is not UTF-8 (``WatchfilesRustInternalError``);
    a producer must not be able to stop the daemon that way, so the failure is
    logged, the folder is scanned (which rejects that file), and watching starts again.
    """
    yield None
    while not stop.is_set():
        failed: str | None = None
        try:
            async for _ in awatch(
                folder,
                watch_filter=job_file_changed,
                stop_event=stop,
                yield_on_timeout=True,
                rust_timeout=max(1, int(rescan_interval_s * 1000)),
                force_polling=force_polling,
                poll_delay_ms=max(50, int(rescan_interval_s * 1000)),
                debounce=50,
                step=WATCH_STEP_MS,
            ):
                yield None
        except* WatchfilesRustInternalError as group:
            failed = str(group.exceptions[0])
        if failed is None:
            return
        log.warning("watcher.restarted", error=failed, retry_in_s=rescan_interval_s)
        yield None
        await wait_event(stop, rescan_interval_s)
