"""systemd's notify protocol over a real AF_UNIX datagram socket: the Notifier alone, then the daemon."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from flowsubmit.local.localserver import LocalServer
from flowsubmit.ops.sdnotify import Notifier
from tests.support.daemons import spawn_daemon


@pytest.fixture
def notify_socket() -> Iterator[tuple[str, socket.socket]]:
    """A bound datagram socket at a short path (AF_UNIX paths are limited to 108 bytes)."""
    with tempfile.TemporaryDirectory(prefix="fs-notify-") as folder:
        path = str(Path(folder) / "notify.sock")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            yield path, sock


def _received(sock: socket.socket) -> list[str]:
    sock.setblocking(False)
    messages: list[str] = []
    while True:
        try:
            messages.append(sock.recv(4096).decode())
        except BlockingIOError:
            return messages


def test_notifier_sends_each_message_as_one_datagram(
    notify_socket: tuple[str, socket.socket],
) -> None:
    """READY, STATUS, STOPPING and WATCHDOG arrive as the datagrams systemd expects."""
    path, sock = notify_socket
    notifier = Notifier(path, watchdog_usec="3000000")
    notifier.ready("0 jobs running")
    notifier.status("1 jobs running")
    notifier.watchdog()
    notifier.stopping()
    assert (notifier.enabled, notifier.watchdog_interval_s) == (True, 1.5)
    assert _received(sock) == [
        "READY=1\nSTATUS=0 jobs running",
        "STATUS=1 jobs running",
        "WATCHDOG=1",
        "STOPPING=1\nSTATUS=stopping",
    ]


def test_notifier_without_systemd_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $NOTIFY_SOCKET and $WATCHDOG_USEC, nothing is sent and no watchdog runs."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    notifier = Notifier()
    notifier.ready("x")
    assert (notifier.enabled, notifier.watchdog_interval_s) == (False, None)


def test_notifier_reaches_an_abstract_socket() -> None:
    """An address starting with ``@`` names a socket in the abstract namespace."""
    name = f"flowsubmit-test-{id(object())}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        Notifier("@" + name).status("hello")
        assert _received(sock) == ["STATUS=hello"]


def test_daemon_notifies_ready_status_and_stopping_in_order(
    served: LocalServer, tmp_path: Path, notify_socket: tuple[str, socket.socket]
) -> None:
    """The daemon sends READY=1 once ready, then STATUS= lines, then STOPPING=1 on SIGTERM, and pings the watchdog."""
    path, sock = notify_socket
    env = served.env(NOTIFY_SOCKET=path, WATCHDOG_USEC="1000000")
    daemon = spawn_daemon(
        tmp_path / "queue", tmp_path / "daemon.log", env, {"rescan_interval_s": 0.2}
    )
    messages: list[str] = []

    def status_and_watchdog_seen() -> bool:
        messages.extend(_received(sock))
        return "WATCHDOG=1" in messages and any(m.startswith("STATUS=") for m in messages)

    try:
        daemon.wait_for(status_and_watchdog_seen, what="STATUS= and WATCHDOG=1")
    finally:
        assert daemon.stop() == 0
    messages.extend(_received(sock))

    # A busy server may miss the first checks' bound (half the watchdog interval): waiting
    # for Prefect pings the watchdog too, before READY=1.
    others = [m for m in messages if not m.startswith("WATCHDOG=1")]
    idle = "0 jobs running, 0 runs tracked, 0 succeeded, 0 failed"
    assert others[0] == f"READY=1\nSTATUS={idle}"
    assert set(others[1:-1]) == {f"STATUS={idle}"}
    assert others[-1] == "STOPPING=1\nSTATUS=stopping"
    assert messages.index("WATCHDOG=1") > 0  # pings start only after READY=1
