"""Test-only fault injection: the daemon kills itself with SIGKILL at a named point (``test_crash_at``)."""

from __future__ import annotations

import os
import signal

__all__ = ["POINTS", "CrashPoints"]

#: The named points, in the order a job passes them.
POINTS = (
    "claim.renamed",  # the job is in processing/, its journal has no `claimed` record yet
    "claimed",  # the `claimed` record is durable, nothing submitted
    "created",  # one more `created` record is durable
    "final",  # one more `final` record is durable
    "finish.result",  # the result file is written, the job not moved yet
    "finish.moved",  # the job is in done/ or failed/ (the commit point), its journal not moved yet
)


class CrashPoints:
    """Counts the named points as they pass and SIGKILLs this process at the configured one.

    A real SIGKILL (not ``sys.exit``) so that nothing runs afterwards: no ``finally``, no
    ``atexit``, no buffered write, exactly as ``kill -9`` from outside, but at a point
    chosen deterministically instead of by racing the daemon's log lines.
    """

    def __init__(self, spec: str | None = None) -> None:
        """``spec`` is ``POINT`` or ``POINT:N`` (the Nth pass of ``POINT``); ``None`` disables it.

        Raises:
            ValueError: an unknown point or a count that is not a positive integer.
        """
        self._point: str | None = None
        self._at = 1
        self._seen = 0
        if not spec:
            return
        point, _, count = spec.partition(":")
        if point not in POINTS:
            raise ValueError(f"unknown crash point {point!r} (known: {', '.join(POINTS)})")
        self._point = point
        self._at = int(count) if count else 1
        if self._at < 1:
            raise ValueError(f"crash point count must be at least 1, not {self._at}")

    @property
    def armed(self) -> bool:
        """Whether a point is configured (a test's daemon): writes it follows are made at once."""
        return self._point is not None

    def passed(self, point: str) -> None:
        """Note that ``point`` was passed; at the configured pass, die by SIGKILL."""
        if point != self._point:
            return
        self._seen += 1
        if self._seen == self._at:
            os.kill(os.getpid(), signal.SIGKILL)
