"""Whether Prefect answers and takes our credentials: the wait at start-up and the periodic check while running."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

from flowsubmit._aio import wait_event
from flowsubmit.errors import AuthenticationError, GatewayError, TransientGatewayError
from flowsubmit.gateway.client import Gateway
from flowsubmit.gateway.connection import display_url
from flowsubmit.logs import get_logger
from flowsubmit.ops.sdnotify import Notifier

__all__ = ["PrefectHealth"]

log = get_logger("flowsubmit.service")

#: While all is well, the periodic check reads with credentials at most this often: the
#: health route is free, but a database read every ``poll_interval_s`` would spend a
#: rate-limited account's budget (a Cloud-style limit of a few requests a second).
CREDENTIALS_EVERY_S = 60.0


class PrefectHealth:
    """Owns the health checks of one gateway, when Prefect stopped answering, and whether it
    refuses the credentials.

    A check is Prefect's health route, then one cheap authenticated read: the health
    route answers without credentials, so it cannot tell a wrong key from a right one.
    Refused credentials (401/403) count as Prefect not answering: nothing is claimed,
    running jobs wait within ``prefect_outage_tolerance_s``; ``service.unauthorized`` is
    logged once, as an error, instead of a warning per check.
    """

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
        #: Why Prefect refuses the credentials, while it does.
        self.refused: AuthenticationError | None = None

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
            if self.refused is None:  # a refusal is logged once, as an error
                log.warning(
                    "service.waiting_for_prefect",
                    prefect_api_url=display_url(self._gateway.api_url or ""),
                    error=error,
                    retry_in_s=round(delay, 1),
                )
            why = ": it refuses the credentials" if self.refused else ""
            self._notifier.notify("WATCHDOG=1", f"STATUS=waiting for Prefect{why}")
            if beat is not None:
                beat(delay + timeout_s)
            await wait_event(self._stop, delay)
            delay = min(delay * 2, max_delay_s)
        return False

    async def watch(self, running: Callable[[], int], abort: Callable[[str], None]) -> None:
        """One health check per ``poll_interval_s``; ``abort`` once Prefect has been down
        longer than ``prefect_outage_tolerance_s``. The credentials are read again every
        ``CREDENTIALS_EVERY_S``, and on every check while Prefect is down or refuses them.

        Submissions fail by themselves (the gateway's retries are bounded by the same
        tolerance); this covers jobs that only wait for final states, which the tracker
        would otherwise wait for forever.
        """
        period_s = min(self._poll_interval_s, self._tolerance_s / 2)
        checked_at = time.monotonic()  # wait_until_up has just read with credentials
        while not self._stop.is_set():
            credentials = (
                self.down_since is not None or time.monotonic() - checked_at >= CREDENTIALS_EVERY_S
            )
            if credentials:
                checked_at = time.monotonic()
            # A database read besides the health ping: a busy server gets a few seconds.
            if await self._error(timeout_s=max(period_s, 5.0), credentials=credentials) is None:
                if self.down_since is not None:
                    await self.know_server()  # it may be another release now
                self._back()
            elif self.down_since is None:
                self.down_since = time.monotonic()
                if self.refused is None:
                    log.warning("service.prefect_unreachable", running=running())
            elif time.monotonic() - self.down_since > self._tolerance_s:
                what = "refused the credentials" if self.refused else "unreachable"
                abort(f"Prefect {what} for more than {self._tolerance_s:g} s")
            await wait_event(self._stop, period_s)

    async def know_server(self) -> None:
        """Read the server's version (``Gateway.know_server``): once Prefect answers, and again
        after every outage. Not answering now is left to the next check.

        Raises:
            IncompatibleServer: not a Prefect 3 server; the daemon stops.
        """
        with contextlib.suppress(TransientGatewayError):
            await self._gateway.know_server()

    def _back(self) -> None:
        if self.down_since is not None:
            down_s = time.monotonic() - self.down_since
            log.info("service.prefect_reachable", down_s=round(down_s, 1))
        self.down_since = None

    async def _error(self, timeout_s: float, credentials: bool = True) -> str | None:
        """One health check and (with ``credentials``) one authenticated read, bounded
        (Prefect's client retries a refused connection for a minute): None when Prefect
        answers and takes the credentials, else what went wrong."""
        try:
            async with asyncio.timeout(timeout_s):
                error = await self._gateway.health_error()
                if error is None and credentials:
                    await self._gateway.check_credentials()
        except TimeoutError:
            return f"no answer within {timeout_s:g} s"
        except AuthenticationError as exc:
            if self.refused is None:
                log.error(
                    "service.unauthorized",
                    prefect_api_url=display_url(self._gateway.api_url or ""),
                    error=str(exc),
                )
            self.refused = exc
            return str(exc)
        except GatewayError as exc:
            return str(exc)
        if error is None and self.refused is not None:
            log.info("service.authorized", prefect_api_url=display_url(self._gateway.api_url or ""))
            self.refused = None
        return error
