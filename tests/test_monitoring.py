"""The shipped monitoring files: the alert rules (unit-tested with promtool), the Grafana
dashboard, and both read against a real daemon's ``/metrics`` by a real Prometheus."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from flowsubmit.local.localserver import free_port
from tests.support import ROOT
from tests.support.daemons import Daemon, enqueue, result_of
from tests.support.flows import ETL
from tests.support.prometheus import Prometheus, prometheus_server

RULES = ROOT / "config" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "config" / "prometheus" / "alerts_test.yml"
DASHBOARD = ROOT / "config" / "grafana" / "flowsubmit.json"
#: A metric name in a PromQL expression: flowsubmit's, and the Prefect client's served beside them.
_METRIC = re.compile(r"\b((?:flowsubmit|prefect)_[a-z_]+)\b")


def _promtool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool is not installed: apt-get install prometheus (.ci/run does)"
    return subprocess.run(
        [binary, *args], input=stdin, capture_output=True, text=True, cwd=RULES.parent, timeout=120
    )


def _rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def _expressions() -> list[str]:
    """Every PromQL expression of the rules and of the dashboard's panels."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [rule["expr"] for rule in _rules()] + [
        target["expr"] for panel in panels for target in panel["targets"]
    ]


def test_every_alert_is_annotated_and_unit_tested_by_promtool() -> None:
    """`promtool check rules` and `promtool test rules` pass, and every alert has a test group and its annotations."""
    alerts = [rule["alert"] for rule in _rules()]
    assert 3 <= len(alerts) <= 5
    for rule in _rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"].keys() == {"summary", "description", "dashboard_url"}
        assert "/d/flowsubmit/" in rule["annotations"]["dashboard_url"]
    tested = {
        case["alertname"]
        for test in yaml.safe_load(RULE_TESTS.read_text())["tests"]
        for case in test["alert_rule_test"]
        if case["exp_alerts"]
    }
    assert tested == set(alerts)
    checked = _promtool("check", "rules", RULES.name)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    unit = _promtool("test", "rules", RULE_TESTS.name)
    assert unit.returncode == 0, unit.stdout + unit.stderr
    assert json.loads(DASHBOARD.read_text())["uid"] == "flowsubmit"


@pytest.mark.server
@pytest.mark.timeout(600)  # run alone on a loaded machine, the session server's start counts here
def test_prometheus_fires_the_failure_alert_on_a_failing_job(
    start_daemon: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A real Prometheus scrapes a real daemon; a failing job fires FlowsubmitJobsFailing; every metric the rules and the dashboard name is served."""
    port = free_port()
    daemon = start_daemon(metrics_port=port)
    # The shipped rules, but the failure alert without its 5 minutes of `for`: this test
    # shows the expression fires; promtool's unit tests show the `for`.
    rules = yaml.safe_load(RULES.read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] == "FlowsubmitJobsFailing":
            rule["for"] = "0s"
    test_rules = tmp_path / "alerts.yml"
    test_rules.write_text(yaml.safe_dump(rules))

    with prometheus_server(tmp_path / "prometheus", f"127.0.0.1:{port}", test_rules) as prom:
        # The failure ratio needs the failed series seen at 0 before the failure.
        _wait(prom, lambda: prom.query('flowsubmit_jobs_total{status="failed"} == 0'), "a scrape")
        job_id = enqueue(
            daemon.queue, {"deployment": ETL, "runs": [{"parameters": {"table": 1, "fail": True}}]}
        )
        folder, _ = daemon.wait_for(lambda: result_of(daemon.queue, job_id), what="result")
        assert folder == "failed"
        alert = _wait(prom, lambda: _firing(prom, "FlowsubmitJobsFailing"), "the alert")
        print(json.dumps(alert, indent=2))  # the closing note of the issue quotes it
        assert alert["labels"] == {
            "alertname": "FlowsubmitJobsFailing",
            "instance": f"127.0.0.1:{port}",
            "job": "flowsubmit",
            "severity": "warning",
        }
        assert alert["annotations"]["summary"] == (
            f"100% of flowsubmit jobs on 127.0.0.1:{port} failed in the last hour"
        )
        assert prom.query('up{job="flowsubmit"} == 1')

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        scrape = response.read().decode()
    linted = _promtool("check", "metrics", stdin=scrape)
    assert linted.returncode == 0, linted.stdout + linted.stderr
    served = {s.name for f in text_string_to_metric_families(scrape) for s in f.samples}
    named = {name for expr in _expressions() for name in _METRIC.findall(expr)}
    assert named - served == set()
    assert {"prefect_events_observed_total", "process_cpu_seconds_total"} <= served


def _firing(prom: Prometheus, name: str) -> dict[str, Any] | None:
    alerts = prom.api("alerts")["alerts"]
    return next(
        (a for a in alerts if a["labels"]["alertname"] == name and a["state"] == "firing"), None
    )


def _wait(prom: Prometheus, predicate: Callable[[], Any], what: str, timeout_s: float = 90) -> Any:
    """Poll ``predicate`` until truthy; fail with Prometheus's log on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}:\n{prom.log_path.read_text()[-4000:]}")
