"""How often one claimed job's file is parsed and its plan built, counted in a real daemon (in-process)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flowsubmit.jobs.model import Job, Stage
from flowsubmit.local.localserver import LocalServer
from flowsubmit.queue.folders import Queue
from flowsubmit.queue.journal import replay
from flowsubmit.service.daemon import Service
from flowsubmit.settings import Settings
from tests.support.flows import ETL


@pytest.fixture
def counted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Counter[str]]:
    """Calls of ``Job.model_validate`` (a parse of the file), ``Job.resolved_stages`` (the job's
    defaults merged into its stages: the plan built) and ``Stage.expand`` (a stage's runs listed)."""
    counts: Counter[str] = Counter()
    validate, resolve, expand = Job.model_validate, Job.resolved_stages, Stage.expand

    def counting_validate(*args: Any, **kwargs: Any) -> Job:
        counts["parsed"] += 1
        return validate(*args, **kwargs)

    def counting_expand(self: Stage, *args: Any, **kwargs: Any) -> Any:
        counts["expanded"] += 1
        return expand(self, *args, **kwargs)

    def counting_resolve(self: Job) -> Any:
        counts["planned"] += 1
        return resolve(self)

    monkeypatch.setattr(Job, "model_validate", counting_validate)
    monkeypatch.setattr(Job, "resolved_stages", counting_resolve)
    monkeypatch.setattr(Stage, "expand", counting_expand)
    umask, interval = os.umask(0o022), sys.getswitchinterval()
    os.umask(umask)
    yield counts
    os.umask(umask)  # the daemon sets its own
    sys.setswitchinterval(interval)


async def test_a_claimed_two_stage_job_is_parsed_once_and_planned_once(
    served: LocalServer, tmp_path: Path, counted: Counter[str]
) -> None:
    queue = Queue(tmp_path / "q")
    queue.ensure()
    service = Service(Settings(queue=queue.root, rescan_interval_s=0.2))
    daemon = asyncio.create_task(service.run())
    job = {"id": "planned-once", "deployment": ETL, "stages": [_stage(1), _stage(2)]}
    queue.enqueue(json.dumps(job).encode(), "planned-once")
    try:
        for _ in range(300):  # a minute at most
            if queue.outcome("planned-once") is not None:
                break
            await asyncio.sleep(0.2)
    finally:
        service.stop()
        await daemon
    assert (queue.outcome("planned-once") or ("not ended",))[0] == "done"
    assert counted == {"parsed": 1, "planned": 1, "expanded": 2}
    # The claim recorded the plan's total: `status` reads it from the journal, never the job file.
    assert replay(queue.done / "planned-once.journal").total_runs == 2


def _stage(table_id: int) -> dict[str, Any]:
    return {"runs": [{"parameters": {"table": table_id, "seconds": 0.05}}]}
