"""The daemon on Prefect's production topology: PostgreSQL, Redis messaging, two API replicas, auth.

The daemon talks to replica A; the served flows and the test driver talk to replica B, so
every state change is committed through B and every final event reaches A's websocket
only through Redis. ``pytest -m production`` runs these alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from redis import Redis

from flowsubmit import AuthenticationError, flow_submitter
from flowsubmit.cli.demo import FAILING_TABLES
from flowsubmit.engine.runset import job_tag
from flowsubmit.errors import TransientGatewayError
from flowsubmit.gateway.translate import translate_errors
from flowsubmit.local.localserver import LocalServer
from flowsubmit.local.topology import REDIS, Topology, claim_redis_db, release_redis_db
from tests.support.crashkit import BackgroundDriver, client_of, server_runs
from tests.support.daemons import Daemon, enqueue, result_of
from tests.support.driver import drive
from tests.support.flows import DRIVEN, ETL
from tests.support.jobs import make_job
from tests.support.proxy import Proxy, running
from tests.test_crash import (
    assert_exactly_once,
    drop,
    kill_9_then_restart,
    two_daemons_run_each_job_once,
)

#: Starting the topology (a migration, three Prefect processes) counts against the first test's timeout.
#: One xdist group: the topology is a session fixture, so the tests share one worker and one topology.
pytestmark = [
    pytest.mark.production,
    pytest.mark.timeout(1200),
    pytest.mark.xdist_group("production"),
]


def test_two_claims_get_distinct_redis_indexes_and_a_released_one_is_empty() -> None:
    """Two claims get different Redis database indexes; releasing one empties it, so the next claim may take it."""
    first = claim_redis_db()
    try:
        second = claim_redis_db()
        with Redis.from_url(f"{REDIS}/{second}") as client:
            assert client.dbsize() == 1  # the owner key: no other claim accepts the index
            release_redis_db(second)
            assert client.dbsize() == 0  # what a claim requires
        assert first != second
    finally:
        release_redis_db(first)


def test_matrix_job_with_two_failures_is_tracked_across_replicas(
    start_prod_daemon: Callable[..., Daemon], topology_served: Topology
) -> None:
    """A 20-run job (2 fail on purpose) run through replica B ends with the exact summary, every run as the server holds it."""
    daemon = start_prod_daemon()
    tables = [t for t in range(1, 21) if t not in FAILING_TABLES]
    job = {
        "deployment": ETL,
        "parameters": {"seconds": 0},
        "runs": [{"parameters": {"table": t, "fail": True}} for t in FAILING_TABLES],
        "matrix": {"table": tables},
    }
    job_id = enqueue(daemon.queue, job)

    folder, result = daemon.wait_for(
        lambda: result_of(daemon.queue, job_id), timeout_s=600, what="result"
    )
    assert daemon.stop() == 0

    assert (folder, result["status"]) == ("failed", "failed")
    assert result["summary"] == {
        "total": 20,
        "succeeded": 18,
        "failed": 2,
        "cancelled": 0,
        "by_state": {"Completed": 18, "Failed": 2},
        "line": "Summary → 18/20 succeeded, 2 failed",
    }
    assert [r["parameters"]["table"] for r in result["runs"]] == [*FAILING_TABLES, *tables]
    assert [r["state_type"] for r in result["runs"]] == ["FAILED"] * 2 + ["COMPLETED"] * 18
    on_server = {
        str(r.id): r.state_type.value for r in server_runs(job_tag(job_id), topology_served.b)
    }  # type: ignore[union-attr]
    assert on_server == {r["flow_run_id"]: r["state_type"] for r in result["runs"]}
    finished = daemon.events("run.finished")
    assert sorted(line["flow_run_id"] for line in finished) == sorted(on_server)  # once each
    assert daemon.events("tracker.fallback") == []


def test_kill_9_mid_submission_then_restart_creates_every_run_once(
    start_prod_daemon: Callable[..., Daemon], topology_served: Topology
) -> None:
    """Killed with SIGKILL after 15 of 30 creations, a restarted daemon ends the job with each run created once."""
    kill_9_then_restart(start_prod_daemon, "created:15", topology_served.b)


def test_two_daemons_on_one_queue_run_each_of_30_jobs_once(
    start_prod_daemon: Callable[..., Daemon], topology_served: Topology, tmp_path: Path
) -> None:
    """30 one-run jobs dropped into a queue two daemons share each end once, with one run on the server."""
    two_daemons_run_each_job_once(start_prod_daemon, tmp_path / "queue", 30, topology_served.b)


def _driven_job(runs: int) -> dict[str, Any]:
    return make_job(id=f"prod-{uuid.uuid4().hex[:8]}", deployment=DRIVEN, runs=runs)


def _drive(server: LocalServer, run_ids: list[str], final: str = "Completed") -> None:
    with client_of(server):
        asyncio.run(drive(run_ids, final=final))


def _submitted(daemon: Daemon, count: int) -> list[str]:
    """The flow run ids of the first ``count`` runs the daemon submitted, by index."""
    lines = daemon.wait_for_event("run.submitted", count=count)
    return [line["flow_run_id"] for line in sorted(lines, key=lambda line: line["index"])]


def test_event_stream_cut_by_a_proxy_falls_back_to_polling_and_resumes(
    topology_served: Topology, spawn: Callable[..., Daemon]
) -> None:
    """With replica A's websocket cut mid-job the daemon polls (tracker.fallback), the job completes, and the stream resumes."""
    a, b = topology_served.a, topology_served.b
    with running(Proxy(a.port)) as proxy:
        env = a.env(PREFECT_API_URL=proxy.api_url)
        daemon = spawn(env, poll_interval_s=0.5, resubscribe_max_backoff_s=1.0)
        daemon.wait_for_event("service.ready")
        job_id = drop(daemon.queue, _driven_job(10))
        ids = _submitted(daemon, 10)
        _drive(b, ids[:5])
        daemon.wait_for_event("run.finished", count=5)

        proxy.refuse_websockets = True
        proxy.loop.call_soon_threadsafe(proxy.cut_websockets)
        daemon.wait_for_event("tracker.fallback")
        _drive(b, ids[5:], final="Failed")
        folder, result = daemon.wait_for(lambda: result_of(daemon.queue, job_id), what="result")

        proxy.refuse_websockets = False
        daemon.wait_for_event("tracker.resumed")
        assert daemon.stop() == 0

    assert (folder, result["summary"]["succeeded"], result["summary"]["failed"]) == ("failed", 5, 5)
    finished = {line["flow_run_id"]: line["source"] for line in daemon.events("run.finished")}
    assert finished == {i: "event" for i in ids[:5]} | {i: "poll" for i in ids[5:]}
    on_server = {str(r.id): r.state_type.value for r in server_runs(job_tag(job_id), b)}  # type: ignore[union-attr]
    assert on_server == {r["flow_run_id"]: r["state_type"] for r in result["runs"]}
    tracker = [line["event"] for line in daemon.lines() if line["event"].startswith("tracker.")]
    assert tracker == ["tracker.streaming", "tracker.fallback", "tracker.resumed"]


def test_a_refused_auth_string_claims_nothing_and_the_job_runs_once_it_is_fixed(
    topology_served: Topology,
    spawn: Callable[..., Daemon],
    start_prod_daemon: Callable[..., Daemon],
    tmp_path: Path,
) -> None:
    """With a wrong auth string the daemon logs one unauthorized error and leaves the job in incoming/; restarted with the right one it runs it."""
    a, b = topology_served.a, topology_served.b
    queue = tmp_path / "queue"
    job_id = drop(queue, _driven_job(3))
    wrong = spawn(a.env(PREFECT_API_AUTH_STRING="wrong:secret-value"), queue)
    (refused,) = wrong.wait_for_event("service.unauthorized")
    # The credentials are checked again with backoff (0.5, 1, 2 s): nothing changes meanwhile.
    time.sleep(4)
    assert wrong.stop() == 0
    assert (refused["level"], refused["prefect_api_url"]) == ("error", a.api_url)
    assert "Unauthorized" in refused["error"] and "PREFECT_API_AUTH_STRING" in refused["error"]
    assert len(wrong.events("service.unauthorized")) == 1
    assert wrong.events("service.ready") == wrong.events("job.claimed") == []
    assert "secret-value" not in wrong.log_path.read_text()
    assert os.listdir(queue / "incoming") == [f"{job_id}.json"]
    assert os.listdir(queue / "rejected") == os.listdir(queue / "processing") == []

    with BackgroundDriver(job_tag(job_id), server=b):
        right = start_prod_daemon(queue)
        right.wait_for(lambda: result_of(queue, job_id), what="result")
        assert right.stop() == 0
    assert_exactly_once(queue, job_id, runs=3, server=b)
    assert right.events("service.unauthorized") == []


def test_enqueue_check_with_a_refused_auth_string_fails_at_once_and_enqueues_nothing(
    topology_served: Topology, tmp_path: Path
) -> None:
    """``enqueue --check`` with a wrong auth string exits 1 naming the refusal, no traceback, no file queued."""
    queue = tmp_path / "queue"
    job = json.dumps(_driven_job(1)).encode()
    command = [sys.executable, "-m", "flowsubmit.cli", "enqueue", "--check", "--create"]
    env = topology_served.a.env(PREFECT_API_AUTH_STRING="wrong:secret-value")
    done = subprocess.run(
        [*command, "--queue", str(queue), "-"], input=job, capture_output=True, env=env, timeout=60
    )
    stderr = done.stderr.decode()
    assert done.returncode == 1, stderr
    # The route is the first one the client calls with credentials (a CSRF token, here).
    assert re.fullmatch(
        rf"flowsubmit: Prefect: Prefect at {re.escape(topology_served.a.api_url)}/[a-z/-]+ refused"
        r" the credentials \(HTTP 401: Unauthorized\); check PREFECT_API_AUTH_STRING or PREFECT_API_KEY",
        stderr.splitlines()[0],
    ), stderr
    assert "Traceback" not in stderr and "secret-value" not in stderr
    assert list(queue.rglob("*.json")) == []


async def test_the_library_raises_a_clear_error_at_once_for_a_refused_auth_string(
    topology_served: Topology,
) -> None:
    """``flow_submitter`` with a wrong auth string raises AuthenticationError on its first call, naming the setting to check."""
    settings = {PREFECT_API_URL: topology_served.a.api_url, PREFECT_API_AUTH_STRING: "wrong:key"}
    with temporary_settings(settings):
        async with flow_submitter(DRIVEN) as submission:
            with pytest.raises(AuthenticationError) as refused:
                await submission.submit(table=1)
    assert "refused the credentials (HTTP 401" in str(refused.value)
    assert "PREFECT_API_AUTH_STRING or PREFECT_API_KEY" in str(refused.value)


@pytest.mark.parametrize("status", [401, 403])
def test_refused_credentials_are_an_authentication_error_not_a_verdict(status: int) -> None:
    """A 401 or 403 becomes AuthenticationError (waited out like an outage), naming the URL without user info."""
    request = httpx.Request("POST", "http://user:pw@prefect.example/api/deployments/filter")
    response = httpx.Response(status, json={"detail": "Unauthorized"}, request=request)
    with pytest.raises(AuthenticationError) as refused, translate_errors("check credentials"):
        response.raise_for_status()
    assert isinstance(refused.value, TransientGatewayError)
    assert str(refused.value) == (
        "check credentials: Prefect at http://prefect.example/api/deployments/filter refused"
        f" the credentials (HTTP {status}: Unauthorized); check PREFECT_API_AUTH_STRING or PREFECT_API_KEY"
    )


# Last: it restarts replica A.
def test_replica_a_killed_mid_job_and_restarted_loses_no_run(
    topology_served: Topology, start_prod_daemon: Callable[..., Daemon]
) -> None:
    """Replica A (the daemon's) dies by SIGKILL mid-job while runs end through B; once it is back the job completes, each run once."""
    a, b = topology_served.a, topology_served.b
    daemon = start_prod_daemon(poll_interval_s=0.5, resubscribe_max_backoff_s=1.0)
    job_id = drop(daemon.queue, _driven_job(20))
    ids = _submitted(daemon, 20)
    _drive(b, ids[:10])
    daemon.wait_for_event("run.finished", count=10)

    assert a.process is not None
    os.killpg(a.process.pid, signal.SIGKILL)
    a.process.wait()
    daemon.wait_for_event("service.prefect_unreachable")
    _drive(b, ids[10:])
    a.start()
    daemon.wait_for(lambda: result_of(daemon.queue, job_id), what="result")
    # The job may end before the next health check (up to 5 s when A has just come back).
    daemon.wait_for_event("service.prefect_reachable")
    assert daemon.stop() == 0

    assert_exactly_once(daemon.queue, job_id, runs=20, server=b)
    finished = [line["flow_run_id"] for line in daemon.events("run.finished")]
    assert sorted(finished) == sorted(ids)  # each run recorded once
    assert len(daemon.events("service.prefect_reachable")) == 1
