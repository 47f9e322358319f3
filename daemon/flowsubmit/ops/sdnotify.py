"""systemd's notify protocol (``Type=notify``): READY, STATUS, STOPPING and the watchdog."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable

from flowsubmit._aio import wait_event

__all__ = ["Notifier"]


class Notifier:
    """Sends datagrams to ``$NOTIFY_SOCKET``; does nothing when not run by systemd."""

    def __init__(self, address: str | None = None, watchdog_usec: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        if address and address.startswith("@"):  # an abstract socket
            address = "\0" + address[1:]
        self._address = address or None
        usec = watchdog_usec if watchdog_usec is not None else os.environ.get("WATCHDOG_USEC")
        #: Seconds between two WATCHDOG=1 pings (half of systemd's WatchdogSec), or None.
        self.watchdog_interval_s = (
            int(usec) / 2e6 if usec and usec.isdigit() and int(usec) > 0 else None
        )

    @property
    def enabled(self) -> bool:
        """True when there is a socket to notify."""
        return self._address is not None

    def notify(self, *lines: str) -> None:
        """Send ``KEY=value`` lines in one datagram; errors are swallowed (systemd may be gone)."""
        if self._address is None:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            try:
                sock.connect(self._address)
                sock.sendall("\n".join(lines).encode())
            except OSError:
                return

    def ready(self, status: str) -> None:
        """READY=1 with a status line."""
        self.notify("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """STATUS= line shown by ``systemctl status``."""
        self.notify(f"STATUS={status}")

    def stopping(self) -> None:
        """STOPPING=1."""
        self.notify("STOPPING=1", "STATUS=stopping")

    def watchdog(self) -> None:
        """WATCHDOG=1."""
        self.notify("WATCHDOG=1")

    async def keep_alive(
        self, last_tick: Callable[[], float], stale_after_s: float, stop: asyncio.Event
    ) -> None:
        """Ping the watchdog only while ``last_tick()`` (monotonic) is recent, so a wedged loop gets restarted."""
        interval_s = self.watchdog_interval_s
        if interval_s is None:
            return
        while not stop.is_set():
            if time.monotonic() - last_tick() < stale_after_s:
                self.watchdog()
            await wait_event(stop, interval_s)
