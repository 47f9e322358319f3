"""Whether Prefect answers: the wait for it at start-up and the periodic check while the daemon runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from flowsubmit._aio import wait_event
from flowsubmit.errors import GatewayError
from flowsubmit.gateway import Gateway
from flowsubmit.sdnotify import Notifier

__all__ = ["PrefectHealth"]

log = structlog.get_logger("flowsubmit.service")


class PrefectHealth:
    """Owns the health checks of one gateway and when Prefect stopped answering."""

    def __init__(
        self,
        gateway: Gateway,
        *,
        stop: asyncio.Event,
        notifier: Notifier,
        poll_interval_s: float,
        outage_tolerance_s: float,
    ) -> None:
        self._gateway = gateway
        self._stop = stop
        self._notifier = notifier
        self._poll_interval_s = poll_interval_s
        self._tolerance_s = outage_tolerance_s
        #: When Prefect stopped answering (monotonic), or None while it answers.
        self.down_since: float | None = None

    async def wait_until_up(self) -> bool:
        """Health-check Prefect with backoff until it answers; False if stopped first.

        systemd arms the watchdog at start-up, not at READY=1, so waiting pings it too
        (waiting for Prefect is progress), and the backoff never outgrows its interval.
        """
        delay, max_delay_s = 0.5, min(30.0, self._notifier.watchdog_interval_s or 30.0)
        while not self._stop.is_set():
            if await self._answers(timeout_s=min(5.0, max_delay_s)):
                return True
            log.warning("service.waiting_for_prefect", retry_in_s=round(delay, 1))
            self._notifier.notify("WATCHDOG=1", "STATUS=waiting for Prefect")
            await wait_event(self._stop, delay)
            delay = min(delay * 2, max_delay_s)
        return False

    async def watch(self, running: Callable[[], int], abort: Callable[[str], None]) -> None:
        """One health check per ``poll_interval_s``; ``abort`` once Prefect has been down
        longer than ``prefect_outage_tolerance_s``.

        Submissions fail by themselves (the gateway's retries are bounded by the same
        tolerance); this covers jobs that only wait for final states, which the tracker
        would otherwise wait for forever.
        """
        period_s = min(self._poll_interval_s, self._tolerance_s / 2)
        while not self._stop.is_set():
            if await self._answers(timeout_s=max(period_s, 1.0)):
                self._back()
            elif self.down_since is None:
                self.down_since = time.monotonic()
                log.warning("service.prefect_unreachable", running=running())
            elif time.monotonic() - self.down_since > self._tolerance_s:
                abort(f"Prefect unreachable for more than {self._tolerance_s:g} s")
            await wait_event(self._stop, period_s)

    def _back(self) -> None:
        if self.down_since is not None:
            down_s = time.monotonic() - self.down_since
            log.info("service.prefect_reachable", down_s=round(down_s, 1))
        self.down_since = None

    async def _answers(self, timeout_s: float) -> bool:
        """One health check, bounded (Prefect's client retries a refused connection for a minute)."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self._gateway.healthy()
        except (TimeoutError, GatewayError):
            return False
