"""Test flows, served with ``flow.serve`` in a subprocess by the session fixture: ``python -m tests.support.flows``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import cast

from prefect import flow, serve
from prefect.deployments.runner import RunnerDeployment

from flowsubmit.local.examples import process_table_etl

#: Served deployments (a runner executes their runs).
ETL = "process-table-etl/process-table-etl-deployment"
SLEEPER = "sleeper/sleeper-deployment"
TIMEOUT = "times-out/times-out-deployment"
#: Registered but never served: its runs stay Scheduled unless a test drives them.
DRIVEN = "driven/driven-deployment"
#: Registered but never served; its parameters are named like secrets (redaction tests drive it).
VAULT = "vault/vault-deployment"


@flow(name="sleeper")
def sleeper(seconds: float = 1.0) -> float:
    """Sleep, then complete."""
    time.sleep(seconds)
    return seconds


@flow(name="times-out", timeout_seconds=1)
def times_out(seconds: float = 30.0) -> None:
    """Exceed its own 1 s timeout: ends Failed, named TimedOut."""
    time.sleep(seconds)


@flow(name="driven")
def driven(table: int = 0, note: str = "") -> int:
    """Never executed: tests move its runs through their states with the API."""
    return table


@flow(name="vault")
def vault(password: str = "", token: str = "", api_key: str = "", table: int = 0) -> int:
    """Never executed: takes parameters named like secrets, which must never leak."""
    return table


def _deployment(f: object, name: str) -> RunnerDeployment:
    return cast(RunnerDeployment, f.to_deployment(name=name))  # type: ignore[attr-defined]


def main() -> None:
    """Register the driven deployment, then serve the others; signal readiness by a file."""
    driven_deployment = _deployment(driven, "driven-deployment")
    driven_deployment.apply()
    _deployment(vault, "vault-deployment").apply()
    deployments = [
        _deployment(process_table_etl, "process-table-etl-deployment"),
        _deployment(sleeper, "sleeper-deployment"),
        _deployment(times_out, "times-out-deployment"),
    ]
    for deployment in deployments:
        deployment.apply()
    ready = os.environ.get("FLOWSUBMIT_READY_FILE")
    if ready:
        Path(ready).write_text("READY")
    serve(*deployments, limit=int(os.environ.get("FLOWSUBMIT_SERVE_LIMIT", "8")))


if __name__ == "__main__":
    main()
