"""The library API (``flow_submitter``) against the real Prefect server: the five patterns of docs/library.md and its promises."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import pytest
from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags

from flowsubmit import (
    ClosedError,
    PermanentGatewayError,
    TransientGatewayError,
    WaitTimeout,
    flow_submitter,
)
from flowsubmit.engine.runset import submission_key
from flowsubmit.local.localserver import LocalServer, free_port
from tests.support.driver import drive, late, wait_for_runs
from tests.support.flows import DRIVEN, ETL
from tests.support.proxy import Proxy
from tests.support.waiting import until

pytestmark = pytest.mark.server


@pytest.fixture(autouse=True)
def _server(served: LocalServer) -> LocalServer:
    """Every test here needs the real server and the served flows."""
    return served


async def _server_runs(run_ids: list[str]) -> dict[str, dict[str, Any]]:
    """What Prefect itself holds for the given runs."""
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=run_ids))
        )
    return {
        str(r.id): {
            "parameters": r.parameters,
            "tags": sorted(r.tags),
            "idempotency_key": r.idempotency_key,
            "name": r.name,
            "state": r.state.name if r.state else None,
        }
        for r in runs
    }


async def _count_tagged(*tags: str) -> int:
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=list(tags)))
        )
    return len(runs)


async def _deployment_id(name: str) -> str:
    async with get_client() as client:
        return str((await client.read_deployment_by_name(name)).id)


#: The fields the library's log records carry as attributes, besides ``event``.
_FIELDS = (
    "submission_id",
    "deployment",
    "index",
    "attempt",
    "run_id",
    "flow_run_name",
    "previous_flow_run_id",
    "state",
    "state_type",
    "source",
    "total",
    "succeeded",
    "failed",
    "by_state",
    "error",
    "work_pool",
    "work_queue",
    "hint",
)


@contextlib.contextmanager
def capture_logs() -> Iterator[list[dict[str, Any]]]:
    """The library's log records (stdlib logging; the run logger inside a flow) as dicts of event, level, message and fields."""
    logs: list[dict[str, Any]] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if hasattr(record, "event"):
                # The submitted run's id is the record's `run_id` (Prefect reads `flow_run_id`).
                fields = {
                    "flow_run_id" if k == "run_id" else k: getattr(record, k)
                    for k in _FIELDS
                    if hasattr(record, k)
                }
                logs.append(
                    {
                        "event": record.event,
                        "log_level": record.levelname.lower(),
                        **fields,
                        "message": record.getMessage(),
                    }
                )

    handler = _Keep(logging.INFO)
    loggers = [logging.getLogger("flowsubmit"), logging.getLogger("prefect.flow_runs")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        yield logs
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(handler)
            logger.setLevel(level)


def _events(logs: Sequence[Mapping[str, Any]], name: str, *keys: str) -> list[tuple[Any, ...]]:
    """The given keys of every captured ``name`` line, ordered by run index when there is one."""
    lines = [e for e in logs if e["event"] == name]
    lines.sort(key=lambda e: e.get("index", 0))
    return [tuple(e[k] for k in keys) for e in lines]


# -- pattern 1: parallel submission with gather ---------------------------------------------


async def test_pattern_parallel_submission_with_gather() -> None:
    """Runs submitted one by one and with gather all finish, with exact results, logs, keys and cleanup."""
    with capture_logs() as logs:
        etl = flow_submitter(ETL)
        run_id = await etl.submit(table=1, seconds=0.1)
        rest = await asyncio.gather(
            *[etl.submit(table=i, fail=i == 3, seconds=0.1) for i in range(2, 5)]
        )
        results = await etl.wait(poll_interval=1, show_summary=True)
        failed = [k for k, v in results.items() if v != "Completed"]

    run_ids = [run_id, *rest]
    assert etl.run_ids == run_ids
    assert results == {r: "Failed" if t == 3 else "Completed" for t, r in enumerate(run_ids, 1)}
    assert failed == etl.failed() == [run_ids[2]]
    assert etl.succeeded() == [r for r in run_ids if r != run_ids[2]]
    assert not etl.connected  # plain use: wait() closed the subscription and the client
    deployment_id = await _deployment_id(ETL)
    on_server = await _server_runs(run_ids)
    assert [on_server[r]["parameters"] for r in run_ids] == [
        {"table": 1, "seconds": 0.1},
        *({"table": t, "fail": t == 3, "seconds": 0.1} for t in range(2, 5)),
    ]
    assert [on_server[r]["idempotency_key"] for r in run_ids] == [
        submission_key(deployment_id, etl.submission_id, i, 0) for i in range(4)
    ]
    assert all(on_server[r]["tags"] == [etl.tag] for r in run_ids)
    assert _events(logs, "submission.run_finished", "index", "flow_run_id", "message") == [
        (
            i,
            r,
            f"{'❌' if i == 2 else '✅'} [{ETL}] Run {r[:8]} finished with state: "
            f"{'Failed' if i == 2 else 'Completed'}",
        )
        for i, r in enumerate(run_ids)
    ]
    assert [e for e in logs if e["event"] == "submission.summary"] == [
        {
            "event": "submission.summary",
            "log_level": "info",
            "submission_id": etl.submission_id,
            "deployment": ETL,
            "total": 4,
            "succeeded": 3,
            "failed": 1,
            "by_state": {"Completed": 3, "Failed": 1},
            "message": "Summary → 3/4 succeeded, 1 failed",
        }
    ]


# -- pattern 2: reacting to failures and retrying them ----------------------------------------


async def test_pattern_react_to_failures_and_retry_them() -> None:
    """retry_failed() resubmits only the runs that did not complete, with new keys, and they replace them."""
    with capture_logs() as logs:
        async with flow_submitter(DRIVEN, poll_interval=1) as tables:
            first = await asyncio.gather(*[tables.submit(table=t) for t in range(5)])
            await drive(first[:3], final="Completed")
            await drive(first[3:], final="Failed")  # the driver plays a flaky flow
            before = await tables.wait()
            assert tables.failed() == first[3:]
            retried = await tables.retry_failed()
            await drive(retried, final="Completed")
            after = await tables.wait()
        with pytest.raises(ClosedError):
            await tables.submit(table=9)

    assert before == {r: "Failed" if i >= 3 else "Completed" for i, r in enumerate(first)}
    assert tables.run_ids == [*first[:3], *retried]
    assert after == {r: "Completed" for r in [*first[:3], *retried]}
    assert tables.failed() == []
    deployment_id = await _deployment_id(DRIVEN)
    on_server = await _server_runs(retried)
    assert [on_server[r]["parameters"] for r in retried] == [{"table": 3}, {"table": 4}]
    assert [on_server[r]["idempotency_key"] for r in retried] == [
        submission_key(deployment_id, tables.submission_id, i, 1) for i in (3, 4)
    ]
    assert await _count_tagged(tables.tag) == 7
    assert _events(
        logs,
        "submission.retrying",
        "index",
        "attempt",
        "flow_run_id",
        "previous_flow_run_id",
        "state",
    ) == [(3, 2, retried[0], first[3], "Failed"), (4, 2, retried[1], first[4], "Failed")]
    assert _events(logs, "submission.summary", "message") == [
        ("Summary → 3/5 succeeded, 2 failed",),
        ("Summary → 5/5 succeeded, 0 failed",),
    ]


# -- pattern 3: a two-phase pipeline ------------------------------------------------------------


async def extract_then_transform(
    tables: list[int], marker: str, failing: frozenset[int] = frozenset()
) -> dict[str, str] | None:
    """The docs' pipeline (plus ``failing``, to make extracts fail on purpose; ``marker``
    tags this test's runs apart from the docs snippet's, which runs the same pipeline)."""
    async with flow_submitter(ETL, tags=["extract", marker]) as extract:
        await asyncio.gather(
            *[extract.submit(table=t, mode="extract", fail=t in failing, seconds=0) for t in tables]
        )
        await extract.wait()
        if extract.failed():
            return None
    async with flow_submitter(ETL, tags=["transform", marker]) as transform:
        await asyncio.gather(
            *[transform.submit(table=t, mode="transform", seconds=0) for t in tables]
        )
        return await transform.wait()


async def test_pattern_two_phase_pipeline() -> None:
    """The transform phase starts only when every extract completed, and then runs in full."""
    marker = f"two-phase-{uuid.uuid4().hex[:8]}"
    stopped, results = await asyncio.gather(  # two pipelines at once, to save time
        extract_then_transform([1], marker, failing=frozenset({1})),
        extract_then_transform([2, 3], marker),
    )
    assert stopped is None
    assert results is not None
    assert list(results.values()) == ["Completed", "Completed"]
    assert await _count_tagged("extract", marker) == 3
    assert (
        await _count_tagged("transform", marker) == 2
    )  # none from the pipeline whose extract failed
    on_server = await _server_runs(list(results))
    assert [on_server[r]["parameters"] for r in results] == [
        {"table": 2, "mode": "transform", "seconds": 0},
        {"table": 3, "mode": "transform", "seconds": 0},
    ]
    tags = [on_server[r]["tags"] for r in results]
    assert tags[0] == tags[1] and tags[0][1] == "transform"
    assert tags[0][0].startswith("flowsubmit-submission:")


# -- pattern 4: progressive waiting ------------------------------------------------------------


async def test_pattern_progressive_waiting() -> None:
    """A second wait() after more submits waits for the new runs and returns every result."""
    with capture_logs() as logs:
        etl = flow_submitter(DRIVEN, poll_interval=1)
        first = list(await asyncio.gather(*[etl.submit(table=t) for t in (1, 2)]))
        await drive(first, final="Completed")
        after_first = await etl.wait()
        connected_between = etl.connected
        second = list(await asyncio.gather(*[etl.submit(table=t) for t in (3, 4)]))
        await drive(second[:1], final="Completed")
        await drive(second[1:], final="Failed")
        after_second = await etl.wait()

    assert after_first == {r: "Completed" for r in first}
    assert connected_between is False  # closed by wait(), reopened by the next submit()
    assert after_second == {**after_first, second[0]: "Completed", second[1]: "Failed"}
    assert etl.run_ids == [*first, *second]
    assert not etl.connected
    assert _events(logs, "submission.run_finished", "index", "flow_run_id", "state") == [
        (0, first[0], "Completed"),
        (1, first[1], "Completed"),
        (2, second[0], "Completed"),
        (3, second[1], "Failed"),
    ]
    assert _events(logs, "submission.summary", "message") == [
        ("Summary → 2/2 succeeded, 0 failed",),
        ("Summary → 3/4 succeeded, 1 failed",),
    ]


# -- pattern 5: watching one critical run among many ---------------------------------------


async def test_pattern_watch_one_critical_run_among_many() -> None:
    """wait_for() returns as soon as the critical run fails; cancel() stops the other 30 and wait() collects them."""
    with capture_logs() as logs:
        async with flow_submitter(DRIVEN, poll_interval=1) as batch:
            critical = await batch.submit_with(
                {"table": 0}, tags=["critical"], flow_run_name="critical-table-0"
            )
            others = list(await asyncio.gather(*[batch.submit(table=t) for t in range(1, 31)]))
            await drive([critical], final="Failed")  # the others never start
            state = await batch.wait_for(critical)
            pending_then = len(batch.results)
            cancelled = await batch.cancel() if state != "Completed" else []
            results = await batch.wait()

    assert state == "Failed"
    assert pending_then == 1
    assert cancelled == others
    assert results == {critical: "Failed", **{r: "Cancelled" for r in others}}
    assert batch.run_ids == [critical, *others]
    snap = batch.snapshot(critical)
    assert snap is not None and snap.flow_run_name == "critical-table-0"
    on_server = await _server_runs([critical])
    assert on_server[critical]["tags"] == ["critical", batch.tag]
    assert on_server[critical]["name"] == "critical-table-0"
    assert _events(logs, "submission.run_cancelled", "index", "flow_run_id") == [
        (i, r) for i, r in enumerate(others, 1)
    ]
    assert _events(logs, "submission.summary", "by_state", "message") == [
        ({"Cancelled": 30, "Failed": 1}, "Summary → 0/31 succeeded, 1 failed, 30 cancelled")
    ]


# -- submit() and wait() fail clearly: an unknown deployment, Prefect gone past the tolerance ----


async def test_unknown_deployment_raises_a_clear_error_from_submit() -> None:
    """submit() to a deployment that does not exist raises PermanentGatewayError naming it, and leaves nothing open."""
    ghost = flow_submitter("no-such-flow/no-such-deployment")
    with pytest.raises(PermanentGatewayError) as info:
        await ghost.submit(table=1)
    assert str(info.value) == (
        "deployment 'no-such-flow/no-such-deployment' not found or unreadable: "
        "HTTP 404: Deployment not found"
    )
    assert info.value.deployment == "no-such-flow/no-such-deployment"
    assert ghost.run_ids == []
    assert not ghost.connected


async def test_unreachable_prefect_raises_once_the_outage_tolerance_is_spent() -> None:
    """With nothing listening, submit() retries for `outage_tolerance_s`, then raises TransientGatewayError."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        nowhere = flow_submitter(DRIVEN, outage_tolerance_s=1.0)
        with pytest.raises(TransientGatewayError, match="Prefect unreachable"):
            await nowhere.submit(table=1)
    assert nowhere.run_ids == []
    assert not nowhere.connected


async def test_wait_gives_up_once_prefect_is_gone_for_the_outage_tolerance(
    served: LocalServer,
) -> None:
    """Prefect gone mid-wait (every request answered 500, the event stream cut): wait()
    raises TransientGatewayError naming the tolerance once reads have failed that long."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async with Proxy(served.port) as proxy:
        with temporary_settings(updates={PREFECT_API_URL: proxy.api_url}):
            gone = flow_submitter(DRIVEN, poll_interval=0.5, outage_tolerance_s=2.0)
            await gone.submit(table=1)
            proxy.rule = lambda method, path: (500, {}, b"down")
            proxy.cut_websockets(refuse=True)
            started = time.monotonic()
            with pytest.raises(TransientGatewayError) as info:
                await gone.wait()
            waited_s = time.monotonic() - started
    assert "unreachable for 2 s (outage_tolerance_s)" in str(info.value)
    assert waited_s >= 2.0  # not before the tolerance was spent
    assert gone.results == {}
    assert not gone.connected


async def test_wait_timeout_on_a_run_that_never_starts_carries_partial_results() -> None:
    """wait(timeout=...) raises WaitTimeout with the finished run's result and the pending one, then closes."""
    etl = flow_submitter(DRIVEN, poll_interval=1)
    done, never = await asyncio.gather(etl.submit(table=1), etl.submit(table=2))
    await drive([done], final="Completed")
    with pytest.raises(WaitTimeout) as info:
        await etl.wait(timeout=1.5)
    assert str(info.value) == f"1 of 2 runs of {DRIVEN!r} not final after 1.5 s"
    assert info.value.results == {done: "Completed"}
    assert info.value.pending == [never]
    assert not etl.connected

    assert await etl.cancel() == [never]  # reopens, asks, and wait() collects and closes
    assert await etl.wait() == {done: "Completed", never: "Cancelled"}
    assert not etl.connected


# -- further promises ----------------------------------------------------------------------------


async def test_max_concurrency_holds_submits_until_runs_finish() -> None:
    """With max_concurrency=2, a gather of four submits creates two runs, and the rest once those end."""
    etl = flow_submitter(DRIVEN, max_concurrency=2, poll_interval=1)
    submitting = asyncio.ensure_future(asyncio.gather(*[etl.submit(table=t) for t in range(4)]))
    on_server = await wait_for_runs(etl.tag, 2)
    await asyncio.sleep(0)  # let the two submits that got a slot record their runs
    first_two = etl.run_ids
    assert sorted(first_two) == sorted(on_server)
    assert await _count_tagged(etl.tag) == 2
    assert not submitting.done()
    await drive(first_two, final="Completed")
    run_ids = await submitting
    assert run_ids[:2] == first_two
    await drive(run_ids[2:], final="Completed")
    assert await etl.wait(show_summary=False) == {r: "Completed" for r in run_ids}
    assert await _count_tagged(etl.tag) == 4


async def test_same_submission_id_finds_the_runs_instead_of_creating_again() -> None:
    """A rerun with the same submission_id gets the same runs, and cancel() spares the one that ended meanwhile."""
    submission_id = f"rerun-{id(object())}"
    async with flow_submitter(DRIVEN, submission_id=submission_id) as before_crash:
        created = await asyncio.gather(*[before_crash.submit(table=t) for t in range(3)])
    await drive(created[:1], final="Completed")  # ends while no submitter watches it
    async with flow_submitter(DRIVEN, submission_id=submission_id) as after_restart:
        found = await asyncio.gather(*[after_restart.submit(table=t) for t in range(3)])
        cancelled = await after_restart.cancel()
        results = await after_restart.wait(show_summary=False)
    assert found == created
    assert cancelled == created[1:]
    assert results == {created[0]: "Completed", created[1]: "Cancelled", created[2]: "Cancelled"}
    assert await _count_tagged(after_restart.tag) == 3
    on_server = await _server_runs(created)
    assert [on_server[r]["state"] for r in created] == ["Completed", "Cancelled", "Cancelled"]


async def test_parameters_the_flow_does_not_take_are_refused_before_creation() -> None:
    """An unknown parameter name raises PermanentGatewayError from submit() and creates nothing."""
    etl = flow_submitter(ETL)
    with pytest.raises(PermanentGatewayError) as info:
        await etl.submit(tabel=1)
    assert str(info.value) == (
        f"{ETL}: the flow takes no parameter 'tabel' (it takes: fail, mode, seconds, table)"
    )
    assert etl.run_ids == []
    assert not etl.connected
    assert await _count_tagged(etl.tag) == 0


async def test_the_first_late_run_is_one_warning_that_says_what_to_do() -> None:
    """Runs nobody picks up turn Late: the script is warned once, at the first, with where
    the runs wait and what to do, instead of a ``wait()`` that waits in silence."""
    with capture_logs() as logs:
        async with flow_submitter(DRIVEN) as runs:
            ids = [await runs.submit(table=i) for i in range(2)]
            await late(ids)  # as Prefect's late-runs service does (it is off in tests)
            await until(lambda: _events(logs, "submission.runs_late"), "the Late warning", 30)
            await drive(ids)  # each run's Late event comes before its final on the stream
            assert await runs.wait(show_summary=False) == {r: "Completed" for r in ids}
    [warning] = [line for line in logs if line["event"] == "submission.runs_late"]
    run_id = warning["flow_run_id"]
    assert run_id in ids
    assert warning["log_level"] == "warning"
    assert warning["message"] == (
        f"⏰ [{DRIVEN}] Run {run_id[:8]} is Late: no worker or runner polls it:"
        " start one, or check the work pool"
    )
    assert warning["hint"] == "no worker or runner polls it: start one, or check the work pool"
    assert "work_pool" in warning and "work_queue" in warning


def test_import_flowsubmit_does_not_import_prefect() -> None:
    """`import flowsubmit` does not import Prefect; the library names are loaded on first use."""
    code = "import sys, flowsubmit; print('prefect' in sys.modules, sorted(flowsubmit.__all__)[-1])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "run_batch"]
    assert flow_submitter.__module__ == "flowsubmit.submission"


def test_every_module_imports_with_warnings_as_errors() -> None:
    """A script run with ``-W error`` (or a suite with pytest's ``filterwarnings = error``)
    imports every flowsubmit module: none calls a deprecated API as it loads."""
    code = (
        "import importlib, pkgutil, flowsubmit\n"
        "names = [m.name for m in pkgutil.walk_packages(flowsubmit.__path__, 'flowsubmit.')\n"
        "         if not m.name.endswith('__main__')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print(len(names))\n"
    )
    out = subprocess.run(
        [sys.executable, "-W", "error", "-c", code], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout) > 50  # the whole package was walked, not one module


async def test_works_inside_a_flow_run() -> None:
    """Inside a running Prefect flow, the submitter submits, waits and logs the same way (no run logger needed)."""

    @flow(name="library-parent")
    async def parent() -> tuple[list[str], dict[str, str]]:
        async with flow_submitter(DRIVEN) as child:
            ids = list(await asyncio.gather(child.submit(table=1), child.submit(table=2)))
            await drive(ids, final="Completed")
            return ids, await child.wait()

    with capture_logs() as logs:
        ids, results = await parent()
    assert results == {r: "Completed" for r in ids}
    assert _events(logs, "submission.summary", "message") == [
        ("Summary → 2/2 succeeded, 0 failed",)
    ]
