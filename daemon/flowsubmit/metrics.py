"""Prometheus metrics: the registry and every ``flowsubmit_*`` metric (``ops.http`` serves them).

The metrics are module-level objects in a registry of their own (not the process-wide
default one, which a library user's application may own), so the modules that count
do it in one line, e.g. ``metrics.JOBS.labels(status).inc()``. Counting costs nothing
worth measuring when nothing serves them (the library). Every name is documented in
docs/metrics.md.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from flowsubmit._types import FINAL_STATE_TYPES, JobStatus, RunSnapshot
from flowsubmit.errors import GatewayError, TransientGatewayError

__all__ = [
    "BUILD_INFO",
    "DETECTION_LATENCY",
    "JOBS",
    "LAST_TICK",
    "PREFECT_ERRORS",
    "QUEUE_FILES",
    "QUEUE_OLDEST_AGE",
    "REGISTRY",
    "RUNS",
    "RUNS_IN_FLIGHT",
    "SUBMIT_SECONDS",
    "TRACKER_FALLBACKS",
    "TRACKER_STREAMING",
    "count_prefect_error",
    "observe_detection",
]

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
QUEUE_OLDEST_AGE = Gauge(
    "flowsubmit_queue_oldest_age_seconds",
    "Age of the oldest job file waiting in a queue folder (incoming), from its mtime; 0 when empty.",
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


#: Every label value each labelled counter can take: each series exists (at 0) from
#: start-up, so that ``increase(...)`` over a restart sees the first increment.
KNOWN_LABELS: tuple[tuple[Counter, tuple[str, ...]], ...] = (
    (JOBS, (*(s.value for s in JobStatus), "rejected")),
    (RUNS, tuple(sorted(FINAL_STATE_TYPES))),
    (PREFECT_ERRORS, ("transient", "permanent")),
)
for _counter, _values in KNOWN_LABELS:
    for _value in _values:
        _counter.labels(_value)
