"""Whether Prefect answers: the wait for it at start-up and the periodic check while the daemon runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from flowsubmit._aio import wait_event
from flowsubmit.connection import display_url
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

    async def wait_until_up(self, beat: Callable[[float], None] | None = None) -> bool:
        """Health-check Prefect with backoff until it answers; False if stopped first.

        systemd arms the watchdog at start-up, not at READY=1, so waiting pings it too
        (waiting for Prefect is progress), and the backoff never outgrows its interval.
        ``beat(next_within_s)`` is called on every failed check (the heartbeat file).
        """
        delay, max_delay_s = 0.5, min(30.0, self._notifier.watchdog_interval_s or 30.0)
        while not self._stop.is_set():
            timeout_s = min(5.0, max_delay_s)
            error = await self._error(timeout_s)
            if error is None:
                self.down_since = None
                return True
            self.down_since = self.down_since or time.monotonic()
            log.warning(
                "service.waiting_for_prefect",
                prefect_api_url=display_url(self._gateway.api_url or ""),
                error=error,
                retry_in_s=round(delay, 1),
            )
            self._notifier.notify("WATCHDOG=1", "STATUS=waiting for Prefect")
            if beat is not None:
                beat(delay + timeout_s)
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
            if await self._error(timeout_s=max(period_s, 1.0)) is None:
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

    async def _error(self, timeout_s: float) -> str | None:
        """One health check, bounded (Prefect's client retries a refused connection for a
        minute): None when Prefect answers, else what went wrong."""
        try:
            async with asyncio.timeout(timeout_s):
                return await self._gateway.health_error()
        except TimeoutError:
            return f"no answer within {timeout_s:g} s"
        except GatewayError as exc:
            return str(exc)
