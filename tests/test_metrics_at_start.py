"""``/metrics`` of a daemon that has just started: every labelled counter's known series, at 0."""

from __future__ import annotations

import urllib.request
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from flowsubmit.local.localserver import free_port
from tests.support.daemons import Daemon


def test_labelled_counters_start_at_zero_for_every_known_label(
    start_daemon: Callable[..., Daemon],
) -> None:
    """Before any job: ``flowsubmit_jobs_total`` for each status (the documented alert's
    ``failed|timed_out`` included), ``runs_total`` per final state type, ``prefect_errors_total`` per kind."""
    port = free_port()
    start_daemon(metrics_port=port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    series = {
        (sample.name, *sample.labels.values()): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("flowsubmit_") and sample.name.endswith("_total")
    }
    assert series == {
        **{
            ("flowsubmit_jobs_total", status): 0.0
            for status in ("succeeded", "failed", "timed_out", "cancelled", "rejected")
        },
        **{
            ("flowsubmit_runs_total", state_type): 0.0
            for state_type in ("CANCELLED", "COMPLETED", "CRASHED", "FAILED")
        },
        ("flowsubmit_prefect_errors_total", "transient"): 0.0,
        ("flowsubmit_prefect_errors_total", "permanent"): 0.0,
        ("flowsubmit_tracker_fallbacks_total",): 0.0,
    }
