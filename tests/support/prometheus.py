"""A real Prometheus server (Debian's ``prometheus`` binary) on loopback, scraping given targets, and its HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowsubmit.local.localserver import free_port

__all__ = ["Prometheus", "prometheus_server"]


@dataclass(frozen=True)
class Prometheus:
    """A running Prometheus: its port and its API."""

    port: int
    log_path: Path

    def api(self, path: str, **query: str) -> Any:
        """``GET /api/v1/<path>``'s ``data`` (fails the test on an error answer)."""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if query:
            url += "?" + urllib.parse.urlencode(query)
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's vector."""
        return self.api("query", query=expr)["result"]  # type: ignore[no-any-return]


def _config(target: str, rules: Path, interval_s: int) -> str:
    """Prometheus's configuration: one scrape job named ``flowsubmit`` and one rule file."""
    return json.dumps(  # JSON is YAML
        {
            "global": {
                "scrape_interval": f"{interval_s}s",
                "evaluation_interval": f"{interval_s}s",
            },
            "rule_files": [str(rules)],
            "scrape_configs": [
                {"job_name": "flowsubmit", "static_configs": [{"targets": [target]}]}
            ],
        }
    )


@contextmanager
def prometheus_server(
    home: Path, target: str, rules: Path, interval_s: int = 1
) -> Iterator[Prometheus]:
    """Prometheus on 127.0.0.1 (a free port, storage in ``home``) scraping ``target``; stopped by PID at the end."""
    binary = shutil.which("prometheus")
    assert binary, "prometheus is not installed: apt-get install prometheus (.ci/run does)"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "prometheus.yml"
    config.write_text(_config(target, rules, interval_s))
    server = Prometheus(free_port(), home / "prometheus.log")
    with open(server.log_path, "wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address=127.0.0.1:{server.port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        _wait_ready(server, process)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_ready(server: Prometheus, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, server.log_path.read_text()[-4000:]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/-/ready", timeout=5):
                return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"prometheus not ready:\n{server.log_path.read_text()[-4000:]}")
