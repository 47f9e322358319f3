"""A wrong ``PREFECT_API_URL`` is named as such, never as a deployment's fault (the real server)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest

from flowsubmit import PermanentGatewayError, TransientGatewayError, flow_submitter
from flowsubmit.local.localserver import LocalServer, free_port
from tests.support.daemons import Daemon
from tests.support.flows import DRIVEN

HINT = "the server answers but is not a Prefect API: does PREFECT_API_URL end in /api?"


async def test_a_url_without_api_is_named_not_a_prefect_api(served: LocalServer) -> None:
    """The server's URL without ``/api`` (a deployment that exists): the error says the URL is wrong."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    root = served.api_url.removesuffix("/api")
    with temporary_settings(updates={PREFECT_API_URL: root}):
        wrong = flow_submitter(DRIVEN, outage_tolerance_s=5.0)
        with pytest.raises(PermanentGatewayError) as info:
            await wrong.submit(table=1)
    assert HINT in str(info.value)
    assert "not found or unreadable" not in str(info.value)
    assert wrong.run_ids == []


async def test_nothing_listening_is_named_unreachable_not_a_missing_deployment() -> None:
    """Connection refused: the error says Prefect is unreachable and blames no deployment."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{free_port()}/api"}):
        nowhere = flow_submitter(DRIVEN, outage_tolerance_s=1.0)
        with pytest.raises(TransientGatewayError) as info:
            await nowhere.submit(table=1)
    assert "unreachable" in str(info.value)
    assert "not found" not in str(info.value)


#: The library promises to fail within about ``outage_tolerance_s``: this much more is allowed.
OVERSHOOT_S = 8.0


async def _fail_within_the_tolerance(url: str, tolerance_s: float) -> tuple[float, str]:
    """submit() against ``url``: how long until it raised TransientGatewayError, and its message."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}):
        nowhere = flow_submitter(DRIVEN, outage_tolerance_s=tolerance_s)
        started = time.monotonic()
        with pytest.raises(TransientGatewayError) as info:
            await nowhere.submit(table=1)
        return time.monotonic() - started, str(info.value)


async def test_nothing_listening_fails_within_the_outage_tolerance() -> None:
    """Connection refused (httpx retries each connect 3 times): submit() raises within
    ``outage_tolerance_s`` and a few seconds, naming the URL as unreachable."""
    url = f"http://127.0.0.1:{free_port()}/api"
    took_s, message = await _fail_within_the_tolerance(url, 5.0)
    assert took_s < 5.0 + OVERSHOOT_S
    assert f"Prefect API at {url} unreachable for 5 s (outage_tolerance_s)" in message
    assert "not found" not in message


@contextlib.asynccontextmanager
async def _silent_server() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers (a hung proxy or server)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/api"
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_server_that_never_answers_fails_within_the_outage_tolerance() -> None:
    """Connections accepted, never answered: each request would wait out Prefect's request
    timeout (60 s, retried by Prefect's client); submit() still raises within the tolerance."""
    async with _silent_server() as url:
        took_s, message = await _fail_within_the_tolerance(url, 5.0)
    assert took_s < 5.0 + OVERSHOOT_S
    assert f"Prefect API at {url} unreachable for 5 s (outage_tolerance_s)" in message
    assert "not found" not in message


def test_the_daemon_waiting_for_a_url_without_api_says_why(
    served: LocalServer, spawn: Callable[..., Daemon]
) -> None:
    """``flowsubmit run`` on the server's URL without ``/api``: ``service.waiting_for_prefect`` carries the hint."""
    root = served.api_url.removesuffix("/api")
    daemon = spawn(served.env(PREFECT_API_URL=root))
    (waiting,) = daemon.wait_for_event("service.waiting_for_prefect")[:1]
    assert waiting["error"] == f"HTTP 404 from {root}/health: {HINT}"
