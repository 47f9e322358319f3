"""``/metrics`` and ``/healthz``: the daemon's small HTTP server, and the gauges read at each scrape."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path

import prometheus_client
from prometheus_client import CONTENT_TYPE_LATEST, disable_created_metrics, generate_latest

from flowsubmit.errors import SettingsError
from flowsubmit.gateway.connection import versions
from flowsubmit.logs import get_logger
from flowsubmit.metrics import (
    BUILD_INFO,
    QUEUE_FILES,
    QUEUE_OLDEST_AGE,
    REGISTRY,
    RUNS_IN_FLIGHT,
    TRACKER_STREAMING,
)
from flowsubmit.ops.backlog import oldest_age_s

__all__ = ["HealthCheck", "serve", "track_gauges"]

log = get_logger("flowsubmit.metrics")


def track_gauges(
    *,
    in_flight: Callable[[], float],
    streaming: Callable[[], float],
    queue_files: Callable[[str], float],
    folders: Iterable[str],
    incoming: Path,
) -> None:
    """Read the gauges from their owners at every scrape (the daemon calls this once)."""
    RUNS_IN_FLIGHT.set_function(in_flight)
    TRACKER_STREAMING.set_function(streaming)
    for folder in folders:
        QUEUE_FILES.labels(folder).set_function(functools.partial(queue_files, folder))
    QUEUE_OLDEST_AGE.labels("incoming").set_function(functools.partial(oldest_age_s, incoming))
    BUILD_INFO.labels(*versions()).set(1)


#: The health answer: ``None`` when healthy, else the reason (served as 503).
HealthCheck = Callable[[], str | None]


@contextlib.asynccontextmanager
async def serve(host: str, port: int, health: HealthCheck) -> AsyncIterator[int]:
    """Serve ``/metrics`` and ``/healthz`` on ``host:port`` until the block ends; yields the port.

    A tiny HTTP/1.0 handler on asyncio, so the daemon needs no thread and no web
    framework: a scrape reads a few counters and writes one response.
    """
    # The *_created series only add noise to every counter.
    disable_created_metrics()  # type: ignore[no-untyped-call]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                request = await reader.readuntil(b"\r\n\r\n")
                writer.write(_respond(request, health))
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass  # a client that hangs up or sends garbage gets nothing more
        finally:
            writer.close()

    try:
        server = await asyncio.start_server(handle, host, port)
    except OSError as exc:
        raise SettingsError(
            "metrics_port", f"cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from exc
    bound = int(server.sockets[0].getsockname()[1])
    log.info("metrics.serving", host=host, port=bound)
    try:
        yield bound
    finally:
        server.close()
        await server.wait_closed()


def _respond(request: bytes, health: HealthCheck) -> bytes:
    """The whole HTTP response to one request."""
    parts = request.split(b" ", 2)
    method = parts[0] if parts else b""
    path = parts[1].split(b"?", 1)[0] if len(parts) > 1 else b""
    if method not in (b"GET", b"HEAD"):
        return _http(405, "text/plain", b"method not allowed\n")
    if path == b"/metrics":
        return _http(200, CONTENT_TYPE_LATEST, _exposition(), head=method == b"HEAD")
    if path == b"/healthz":
        reason = health()
        body = {"status": "ok"} if reason is None else {"status": "unhealthy", "reason": reason}
        code = 200 if reason is None else 503
        data = (json.dumps(body) + "\n").encode()
        return _http(code, "application/json", data, head=method == b"HEAD")
    return _http(404, "text/plain", b"not found: try /metrics or /healthz\n")


def _exposition() -> bytes:
    """flowsubmit's registry, then the process-wide default one.

    The daemon owns its process, so the default registry is its own too: it holds the
    Prefect client's counters (``prefect_events_observed``,
    ``prefect_event_websocket_connections``, ...) and ``process_*``/``python_*``. No
    name is in both.
    """
    return generate_latest(REGISTRY) + generate_latest(prometheus_client.REGISTRY)


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def _http(code: int, content_type: str, body: bytes, *, head: bool = False) -> bytes:
    header = (
        f"HTTP/1.0 {code} {_REASONS[code]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return header.encode() + (b"" if head else body)
