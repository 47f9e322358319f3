"""The example flow of the demo, served with ``flow.serve``: ``python -m flowsubmit.examples``."""

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
    """Serve the example deployment and signal readiness through ``$FLOWSUBMIT_READY_FILE``."""
    deployment = cast(
        RunnerDeployment, process_table_etl.to_deployment(name="process-table-etl-deployment")
    )
    ready = os.environ.get("FLOWSUBMIT_READY_FILE")
    if ready:
        # serve() blocks; the deployment exists once to_deployment has been applied by serve,
        # so the readiness file is written from the runner's startup hook below.
        _ready_after_apply(Path(ready))
    serve(deployment, limit=int(os.environ.get("FLOWSUBMIT_SERVE_LIMIT", "8")))


def _ready_after_apply(ready: Path) -> None:
    import threading

    from prefect.client.orchestration import get_client

    def poll() -> None:
        with get_client(sync_client=True) as client:
            while True:
                try:
                    client.read_deployment_by_name("process-table-etl/process-table-etl-deployment")
                    ready.write_text("READY")
                    return
                except Exception:
                    time.sleep(0.2)

    threading.Thread(target=poll, daemon=True).start()


if __name__ == "__main__":
    main()
