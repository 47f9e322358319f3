"""Knowing the server: ``/admin/version`` read at start, features decided from it, the wrong
servers refused (a Prefect 2 server, an API that is not Prefect's)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from packaging.version import Version
from prefect.settings import PREFECT_API_URL, temporary_settings
from structlog.testing import capture_logs

from flowsubmit import flow_submitter
from flowsubmit._types import RunRequest
from flowsubmit.engine.runset import idempotency_key
from flowsubmit.errors import IncompatibleServer
from flowsubmit.gateway.client import Gateway
from flowsubmit.gateway.server import BULK_SINCE, CLIENT_RULE, judge
from flowsubmit.local.localserver import LocalServer
from tests.support.daemons import Daemon
from tests.support.flows import DRIVEN
from tests.support.proxy import Proxy, Reply, running

WHERE = "http://prefect.example/api"


def _version_answer(
    body: bytes, content_type: str = "application/json"
) -> Callable[..., Reply | None]:
    """A proxy rule: ``/admin/version`` answers ``body``, as the server in front of it would not."""

    def rule(method: str, path: str) -> Reply | None:
        if path.endswith("/admin/version"):
            return 200, {"Content-Type": content_type}, body
        return None

    return rule


# -- judging an answer (pure logic) ----------------------------------------------------------


def test_a_server_from_3_6_16_on_takes_bulk_creates() -> None:
    assert judge("3.6.16", "3.6.16", where=WHERE).bulk
    assert judge("3.9.1", "3.9.1", where=WHERE).bulk
    assert not judge("3.6.15", "3.6.15", where=WHERE).bulk
    assert not judge("3.4.25", "3.4.25", where=WHERE).bulk


def test_a_client_newer_than_its_server_is_noticed_and_served() -> None:
    older = judge("3.7.8", "3.9.1", where=WHERE)
    assert (older.client_newer, older.version) == (True, "3.7.8")
    assert not judge("3.9.1", "3.7.8", where=WHERE).client_newer
    assert not judge("3.9.1", "3.9.1", where=WHERE).client_newer


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ("2.20.16", "is a Prefect 2.20.16 server; flowsubmit needs a Prefect 3 server"),
        ("<html>hello</html>", "is not a Prefect server"),
        ({"detail": "Not Found"}, "is not a Prefect server"),
        (None, "is not a Prefect server"),
    ],
)
def test_a_prefect_2_server_or_another_api_is_refused(answer: object, says: str) -> None:
    with pytest.raises(IncompatibleServer, match=says) as info:
        judge(answer, "3.9.1", where=WHERE)
    assert WHERE in str(info.value)


# -- against the real server, behind a proxy that answers /admin/version -------------------


async def test_an_older_server_gets_one_create_per_run_and_never_a_bulk_call(
    served: LocalServer,
) -> None:
    """A server before 3.6.16 (as it reports itself) gets single creates, keys unchanged, without a
    refused bulk call first; the client newer than it is one warning naming both and Prefect's rule."""
    tag = f"older-{uuid.uuid4().hex[:8]}"
    with capture_logs() as logs:
        async with Proxy(served.port, rule=_version_answer(b'"3.6.15"')) as proxy:
            with temporary_settings(updates={PREFECT_API_URL: proxy.api_url}):
                async with Gateway() as gateway:
                    deployment = await gateway.resolve_deployment(DRIVEN)
                    requests = [
                        RunRequest(
                            idempotency_key(deployment.id, tag, 0, i, 0), {"table": i}, tags=(tag,)
                        )
                        for i in range(6)
                    ]
                    ids = await asyncio.gather(
                        *(gateway.create_run(deployment, r) for r in requests)
                    )
                    assert gateway.server is not None and not gateway.server.bulk
    assert len(set(ids)) == 6
    assert proxy.count("/create_flow_run/bulk") == 0
    assert proxy.count("/admin/version") == 1
    # One create per run; a create the server refused for contention (503: "database is
    # locked" on SQLite) is sent again by Prefect's own client.
    creates = [s.status for s in proxy.seen if s.path.endswith("/create_flow_run")]
    assert creates.count(201) == 6 and set(creates) <= {201, 503}, creates
    older = [e for e in logs if e["event"] == "gateway.server_older"]
    assert [(e["log_level"], e["server_version"], e["rule"]) for e in older] == [
        ("warning", "3.6.15", CLIENT_RULE)
    ]
    assert older[0]["client_version"] > "3.6.15"
    assert not [e for e in logs if e["event"] == "gateway.bulk_unavailable"]


async def test_the_library_refuses_a_prefect_2_server_before_creating_anything(
    served: LocalServer,
) -> None:
    async with Proxy(served.port, rule=_version_answer(b'"2.20.16"')) as proxy:
        with temporary_settings(updates={PREFECT_API_URL: proxy.api_url}):
            async with flow_submitter(DRIVEN) as submission:
                with pytest.raises(IncompatibleServer, match="Prefect 2.20.16 server"):
                    await submission.submit(table=1)
    assert proxy.count("create_flow_run") == 0


def test_the_daemon_refuses_an_api_that_is_not_prefect_with_one_clear_line(
    served: LocalServer, spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    """A URL whose ``/admin/version`` answers a web page (a UI, another service): the daemon
    exits with an error naming the URL instead of claiming jobs it cannot run."""
    page = _version_answer(b"<!doctype html><title>UI</title>", "text/html")
    with running(Proxy(served.port, rule=page)) as proxy:
        daemon = spawn(served.env(PREFECT_API_URL=proxy.api_url))
        assert daemon.process.wait(60) != 0
    out = daemon.log_path.read_text()
    assert "is not a Prefect server" in out and proxy.api_url in out, out
    assert "service.ready" not in out


def test_the_daemon_logs_the_server_version_when_ready(
    start_daemon: Callable[..., Daemon], served: LocalServer
) -> None:
    daemon = start_daemon()
    ready = daemon.events("service.ready")[0]
    server = daemon.events("gateway.server")[0]
    assert ready["prefect_server_version"] == server["server_version"] != "unknown"
    assert server["bulk"] is (Version(server["server_version"]) >= BULK_SINCE)
    assert daemon.stop() == 0


def test_the_daemon_reads_the_server_version_again_after_an_outage(
    served: LocalServer, spawn: Callable[..., Daemon]
) -> None:
    """Prefect goes away and comes back as an older release (behind the same URL): the
    daemon reads ``/admin/version`` again when it answers, and drops the bulk route."""
    phase = {"now": "up", "older": "3.4.25"}

    def rule(method: str, path: str) -> Reply | None:
        if phase["now"] == "down":
            return 500, {"Content-Type": "application/json"}, b'{"detail":"down"}'
        if phase["now"] == "older":
            return _version_answer(json.dumps(phase["older"]).encode())(method, path)
        return None

    with running(Proxy(served.port, rule=rule)) as proxy:
        daemon = spawn(served.env(PREFECT_API_URL=proxy.api_url))
        daemon.wait_for_event("service.ready")
        (first,) = daemon.events("gateway.server")
        if first["server_version"] == phase["older"]:  # the compatibility run's server
            phase["older"] = "3.4.24"
        phase["now"] = "down"
        daemon.wait_for_event("service.prefect_unreachable")
        phase["now"] = "older"
        daemon.wait_for_event("service.prefect_reachable")
        again = daemon.wait_for_event("gateway.server", count=2)[1]
        assert daemon.stop() == 0

    assert first["bulk"] is (Version(first["server_version"]) >= BULK_SINCE)
    assert (again["server_version"], again["bulk"]) == (phase["older"], False)
