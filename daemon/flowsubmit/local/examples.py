"""The example flow of the demo, served with ``flow.serve``: ``python -m flowsubmit.local.examples``."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import cast

from prefect import flow, serve
from prefect.deployments.runner import RunnerDeployment

__all__ = ["process_table_etl"]


@flow(name="process-table-etl", log_prints=True)
def process_table_etl(
    table: int, mode: str = "full", fail: bool = False, seconds: float = 0.2
) -> str:
    """Pretend to process one table; fails on purpose when ``fail`` is true."""
    time.sleep(seconds)
    if fail:
        raise RuntimeError(f"table {table}: failing on purpose")
    return f"table {table} processed ({mode})"


def main() -> None:
    """Serve the example deployment; write ``$FLOWSUBMIT_READY_FILE`` once it exists on the server."""
    deployment = cast(
        RunnerDeployment, process_table_etl.to_deployment(name="process-table-etl-deployment")
    )
    deployment.apply()
    ready = os.environ.get("FLOWSUBMIT_READY_FILE")
    if ready:
        Path(ready).write_text("READY")
    serve(deployment, limit=int(os.environ.get("FLOWSUBMIT_SERVE_LIMIT", "8")))


if __name__ == "__main__":
    main()
