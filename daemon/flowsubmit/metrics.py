"""Prometheus metrics: the registry, every ``flowsubmit_*`` metric, and the small HTTP server for ``/metrics`` and ``/healthz``.

The metrics are module-level objects in a registry of their own (not the process-wide
default one, which a library user's application may own), so the modules that count
do it in one line, e.g. ``metrics.JOBS.labels(status).inc()``. Counting costs nothing
worth measuring when nothing serves them (the library). Every name is documented in
docs/metrics.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import UTC, datetime

import structlog
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from flowsubmit._types import RunSnapshot
from flowsubmit.connection import versions
from flowsubmit.errors import GatewayError, SettingsError, TransientGatewayError

__all__ = [
    "BUILD_INFO",
    "DETECTION_LATENCY",
    "JOBS",
    "LAST_TICK",
    "PREFECT_ERRORS",
    "QUEUE_FILES",
    "REGISTRY",
    "RUNS",
    "RUNS_IN_FLIGHT",
    "SUBMIT_SECONDS",
    "TRACKER_FALLBACKS",
    "TRACKER_STREAMING",
    "count_prefect_error",
    "observe_detection",
    "serve",
    "track_gauges",
]

log = structlog.get_logger("flowsubmit.metrics")

REGISTRY = CollectorRegistry(auto_describe=True)

JOBS = Counter(
    "flowsubmit_jobs",
    "Jobs ended, by status (succeeded, failed, timed_out, cancelled, rejected).",
    ["status"],
    registry=REGISTRY,
)
RUNS = Counter(
    "flowsubmit_runs",
    "Run attempts recorded final, by Prefect state type (COMPLETED, FAILED, CRASHED, CANCELLED).",
    ["state_type"],
    registry=REGISTRY,
)
RUNS_IN_FLIGHT = Gauge(
    "flowsubmit_runs_in_flight",
    "Runs created and not final yet (tracked by this daemon).",
    registry=REGISTRY,
)
QUEUE_FILES = Gauge(
    "flowsubmit_queue_files",
    "Job files per queue folder (results, journals and error files not counted).",
    ["folder"],
    registry=REGISTRY,
)
TRACKER_STREAMING = Gauge(
    "flowsubmit_tracker_streaming",
    "1 while the event stream is open, 0 while the tracker polls.",
    registry=REGISTRY,
)
TRACKER_FALLBACKS = Counter(
    "flowsubmit_tracker_fallbacks",
    "Times the event stream went down and polling took over.",
    registry=REGISTRY,
)
DETECTION_LATENCY = Histogram(
    "flowsubmit_detection_latency_seconds",
    "From a run's end on the Prefect server to its final state recorded here.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
    registry=REGISTRY,
)
SUBMIT_SECONDS = Histogram(
    "flowsubmit_submit_seconds",
    "Duration of one create call to Prefect (a bulk call of up to submit_batch_size runs).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    registry=REGISTRY,
)
PREFECT_ERRORS = Counter(
    "flowsubmit_prefect_errors",
    "Failed calls to Prefect, by kind: transient (retried) or permanent.",
    ["kind"],
    registry=REGISTRY,
)
LAST_TICK = Gauge(
    "flowsubmit_last_tick_timestamp_seconds",
    "Unix time of the daemon loop's last pass (scan of incoming/, or a health check at start).",
    registry=REGISTRY,
)
BUILD_INFO = Gauge(
    "flowsubmit_build_info",
    "Always 1; the labels carry flowsubmit's and the Prefect client's versions.",
    ["version", "prefect_version"],
    registry=REGISTRY,
)


def count_prefect_error(exc: GatewayError) -> None:
    """Count one failed call to Prefect."""
    PREFECT_ERRORS.labels(
        "transient" if isinstance(exc, TransientGatewayError) else "permanent"
    ).inc()


def observe_detection(snap: RunSnapshot) -> None:
    """Count a final state and the time from the run's end on the server until now."""
    RUNS.labels(snap.state_type).inc()
    if snap.end_time is not None:
        latency_s = (datetime.now(UTC) - snap.end_time).total_seconds()
        DETECTION_LATENCY.observe(max(latency_s, 0.0))


def track_gauges(
    *,
    in_flight: Callable[[], float],
    streaming: Callable[[], float],
    queue_files: Callable[[str], float],
    folders: Iterable[str],
) -> None:
    """Read the gauges from their owners at every scrape (the daemon calls this once)."""
    RUNS_IN_FLIGHT.set_function(in_flight)
    TRACKER_STREAMING.set_function(streaming)
    for folder in folders:
        QUEUE_FILES.labels(folder).set_function(functools.partial(queue_files, folder))
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
        return _http(200, CONTENT_TYPE_LATEST, generate_latest(REGISTRY), head=method == b"HEAD")
    if path == b"/healthz":
        reason = health()
        body = {"status": "ok"} if reason is None else {"status": "unhealthy", "reason": reason}
        code = 200 if reason is None else 503
        data = (json.dumps(body) + "\n").encode()
        return _http(code, "application/json", data, head=method == b"HEAD")
    return _http(404, "text/plain", b"not found: try /metrics or /healthz\n")


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable"}


def _http(code: int, content_type: str, body: bytes, *, head: bool = False) -> bytes:
    header = (
        f"HTTP/1.0 {code} {_REASONS[code]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return header.encode() + (b"" if head else body)
