"""One flush per event-loop turn: how the log lines and the journal reach their file in one write a turn.

A burst of final events is handled in a few loop turns, each recording dozens of runs:
a write system call per log line and per journal record cost the daemon about a tenth
of its CPU per run. What a turn appends is written together right after it, before the
loop waits for I/O again; a process killed in between loses that turn's lines and
records only (a ``created`` record is found again by its idempotency key, a ``final``
one read again: the journal's group commit already accepts losing them to a power cut).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["TurnFlush"]


class TurnFlush:
    """Owns when ``flush`` runs: once after the loop turn in which ``soon`` was called, or
    ``delay_s`` after it (one flush for everything asked in that span: a group commit).

    Outside a running loop (a one-shot command, another thread) ``soon`` flushes at
    once. A loop that stopped before the flush ran does not hold the next flush back:
    the flush is scheduled again on the loop running now.
    """

    def __init__(self, flush: Callable[[], None], *, delay_s: float = 0.0) -> None:
        self._flush = flush
        self._delay_s = delay_s
        #: The loop a flush is scheduled on, until it has run.
        self._loop: asyncio.AbstractEventLoop | None = None

    def soon(self) -> None:
        """Flush after this loop turn, or ``delay_s`` from now (at once when no loop runs in this thread)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._flush()
            return
        if self._loop is not loop:
            self._loop = loop
            if self._delay_s:
                loop.call_later(self._delay_s, self._run)
            else:
                loop.call_soon(self._run)

    def _run(self) -> None:
        self._loop = None
        self._flush()
