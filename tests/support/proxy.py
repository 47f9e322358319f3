"""A loopback HTTP proxy in front of a Prefect server, for faults the tests inject: cut websockets, rate limits, missing routes, slow reads.

Plain HTTP requests are parsed one by one (keep-alive included), counted, and
either answered by a rule or forwarded to the server with httpx; a request asking
for a websocket upgrade is passed through byte for byte (Prefect's event stream).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx

__all__ = ["Proxy", "RateLimit", "Seen", "missing_route", "running"]

#: Hop-by-hop and length headers the proxy recomputes instead of copying.
_DROPPED = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "host"})
_DROPPED_RESPONSE = _DROPPED | {"content-encoding"}

Reply = tuple[int, dict[str, str], bytes]
"""(status, headers, body) of an answer the proxy gives itself."""


@dataclass(frozen=True)
class Seen:
    """One HTTP request that reached the proxy, and the status it was answered with."""

    #: ``time.monotonic()`` when the request arrived.
    at: float
    method: str
    path: str
    status: int
    #: The ``Retry-After`` the proxy answered with, in seconds.
    retry_after_s: float = 0.0


class RateLimit:
    """Cloud-style limit: ``per_window`` requests in any sliding ``window_s``; the rest get 429 + ``Retry-After``.

    The health route is exempt, as a load balancer's health check is.
    """

    def __init__(self, per_window: int, window_s: float = 60.0) -> None:
        self.per_window = per_window
        self.window_s = window_s
        self._accepted: deque[float] = deque()

    def __call__(self, method: str, path: str) -> Reply | None:
        if path.endswith("/health"):
            return None
        now = time.monotonic()
        while self._accepted and self._accepted[0] <= now - self.window_s:
            self._accepted.popleft()
        if len(self._accepted) < self.per_window:
            self._accepted.append(now)
            return None
        wait_s = max(1, math.ceil(self._accepted[0] + self.window_s - now))
        body = b'{"detail":"rate limit exceeded"}'
        return 429, {"Retry-After": str(wait_s), "Content-Type": "application/json"}, body


def missing_route(fragment: str, status: int = 404) -> Callable[[str, str], Reply | None]:
    """A rule answering ``status`` (404 or 405) for every path containing ``fragment``, as an older server does."""
    detail = b'{"detail":"Not Found"}' if status == 404 else b'{"detail":"Method Not Allowed"}'

    def rule(method: str, path: str) -> Reply | None:
        if fragment in path:
            return status, {"Content-Type": "application/json"}, detail
        return None

    return rule


class Proxy:
    """Owns one listening socket and its connections; ``async with Proxy(port)``.

    ``rule(method, path)`` may answer a request itself (a ``Reply``) or let it pass
    (``None``); ``delay(method, path)`` seconds are waited before forwarding. Every
    request is appended to ``seen``. A websocket upgrade is refused (HTTP 503) while
    ``refuse_websockets`` is set; ``stall_websockets()`` stops reading what the server
    sends on them (a consumer that cannot keep up), ``resume_websockets()`` goes on.
    """

    def __init__(
        self,
        upstream_port: int,
        *,
        rule: Callable[[str, str], Reply | None] | None = None,
        delay: Callable[[str, str], float] | None = None,
    ) -> None:
        self.upstream_port = upstream_port
        self.rule = rule
        self.delay = delay
        self.refuse_websockets = False
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.seen: list[Seen] = []
        self._server: asyncio.Server | None = None
        self._client: httpx.AsyncClient | None = None
        self._sockets: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def api_url(self) -> str:
        """The Prefect API, through the proxy."""
        return f"http://127.0.0.1:{self.port}/api"

    async def __aenter__(self) -> Proxy:
        self._client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.upstream_port}",
            timeout=None,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=20),
        )
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        #: The loop the proxy runs on (other threads call its methods through it).
        self.loop = asyncio.get_running_loop()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None and self._client is not None
        self._server.close()
        self.cut_websockets(refuse=True)
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 5.0)
        await self._client.aclose()

    def cut_websockets(self, refuse: bool = True) -> None:
        """Close every websocket now passing through; refuse new ones while ``refuse``."""
        self.refuse_websockets = refuse
        for writer in list(self._sockets):
            writer.close()
        self._sockets.clear()

    def stall_websockets(self) -> None:
        """Stop reading from the server on every websocket (new ones too) until ``resume_websockets()``.

        The proxy's socket to the server then takes only a small receive buffer, so the
        server's sends block within a few dozen events, as they would for a stalled client.
        """
        self._flowing.clear()

    def resume_websockets(self) -> None:
        """Read and pass on what the server sends on websockets again."""
        self._flowing.set()

    def count(self, fragment: str = "", status: int | None = None) -> int:
        """Requests seen whose path contains ``fragment`` (and answered ``status``, if given)."""
        return sum(
            1 for s in self.seen if fragment in s.path and (status is None or s.status == status)
        )

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                    return
                if b"upgrade: websocket" in head.lower():
                    await self._tunnel(head, reader, writer)
                    return
                await self._exchange(head, reader, writer)
        except (ConnectionError, OSError, httpx.HTTPError):
            return
        except asyncio.CancelledError:
            # The proxy is closing. Swallowed: asyncio's server reads this task's
            # exception() in a done callback, and a cancelled task's raises there.
            return
        finally:
            writer.close()
            self._handlers.discard(task)

    async def _exchange(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Answer one plain HTTP request: by the rule, or by forwarding it."""
        arrived = time.monotonic()
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        headers = dict(line.split(":", 1) for line in header_lines if ":" in line)
        headers = {k.strip(): v.strip() for k, v in headers.items()}
        length = int(next((v for k, v in headers.items() if k.lower() == "content-length"), 0))
        body = await reader.readexactly(length) if length else b""
        path = target.split("?", 1)[0]
        reply = self.rule(method, path) if self.rule else None
        if reply is None:
            if self.delay is not None and (wait_s := self.delay(method, path)) > 0:
                await asyncio.sleep(wait_s)
            assert self._client is not None
            upstream = await self._client.request(
                method,
                target,
                headers={k: v for k, v in headers.items() if k.lower() not in _DROPPED},
                content=body,
            )
            reply = (
                upstream.status_code,
                {k: v for k, v in upstream.headers.items() if k.lower() not in _DROPPED_RESPONSE},
                upstream.content,
            )
        status, reply_headers, content = reply
        retry_after = float(reply_headers.get("Retry-After", 0))
        self.seen.append(Seen(arrived, method, path, status, retry_after))
        lines = [f"HTTP/1.1 {status} {httpx.codes.get_reason_phrase(status)}"]
        lines += [f"{k}: {v}" for k, v in reply_headers.items()]
        lines.append(f"content-length: {len(content)}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + content)
        await writer.drain()

    async def _tunnel(
        self, head: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Pass a websocket through byte for byte, unless websockets are refused."""
        if self.refuse_websockets:
            # As a proxy or a server still starting answers: not a network error, an HTTP one.
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
            return
        # A small receive buffer, so that a stalled pipe holds back the server at once
        # (loopback buffers otherwise grow to megabytes: thousands of events).
        up_socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        up_socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        up_socket.setblocking(False)
        await asyncio.get_running_loop().sock_connect(up_socket, ("127.0.0.1", self.upstream_port))
        up_reader, up_writer = await asyncio.open_connection(sock=up_socket, limit=4096)
        self._sockets.update((writer, up_writer))
        up_writer.write(head)
        await asyncio.gather(
            _pipe(reader, up_writer), _pipe(up_reader, writer, flowing=self._flowing)
        )
        self._sockets.difference_update((writer, up_writer))


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, flowing: asyncio.Event | None = None
) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while (flowing is None or await flowing.wait()) and (data := await reader.read(4096)):
            # A read under way when the stall began holds its data too: a stall starts at once.
            if flowing is not None:
                await flowing.wait()
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.contextmanager
def running(proxy: Proxy) -> Iterator[Proxy]:
    """Run ``proxy`` on its own event loop in a thread, for tests whose own thread blocks (daemon subprocesses)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-proxy", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(proxy.__aenter__(), loop).result(30)
        try:
            yield proxy
        finally:
            asyncio.run_coroutine_threadsafe(proxy.__aexit__(None, None, None), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()
