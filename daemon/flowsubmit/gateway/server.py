"""What the Prefect server is: its version, read from ``/admin/version``, and what flowsubmit may ask of it.

Read when the gateway first needs it and again after every reconnect (the server may
have been upgraded or rolled back meanwhile). Rules:

- a Prefect 3 server (or later) is served; a Prefect 2 server, or an API whose
  ``/admin/version`` is not a Prefect version, is refused (``IncompatibleServer``);
- a client newer than its server is served, with a warning naming both versions:
  Prefect supports a client the same version as its server or older;
- the bulk create route is used from server 3.6.16 on (the release that added it);
  an older server gets one create call per run, with the same idempotency keys,
  without a refused bulk call first. Prefect Cloud runs the newest server.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
from packaging.version import InvalidVersion, Version
from prefect.client.base import ServerType
from prefect.client.orchestration import PrefectClient

from flowsubmit.errors import IncompatibleServer

__all__ = ["BULK_SINCE", "CLIENT_RULE", "Server", "judge", "read_server"]

#: The first Prefect server with ``POST /deployments/{id}/create_flow_run/bulk``.
BULK_SINCE = Version("3.6.16")
#: Prefect's rule, quoted in the warning when it is broken.
CLIENT_RULE = "Prefect supports a client the same version as its server or older"


@dataclass(frozen=True)
class Server:
    """One answer of ``/admin/version``, judged."""

    #: The version the server reported (``cloud`` for Prefect Cloud, which does not say).
    version: str
    #: Whether create calls may go to the bulk route.
    bulk: bool
    #: The client is newer than the server (Prefect's rule broken; served anyway).
    client_newer: bool


async def read_server(client: PrefectClient, where: str) -> Server:
    """Ask the server behind ``client`` its version (one call, no retries) and judge it.

    Raises:
        IncompatibleServer: not a Prefect 3 server (``where`` names it in the message).
        httpx.HTTPStatusError, httpx.TransportError: as the call raised them.
    """
    if client.server_type == ServerType.CLOUD:
        return cloud()
    response = await client.request("GET", "/admin/version")
    try:
        response.raise_for_status()
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code in (404, 405):
            why = f"GET /admin/version answered HTTP {exc.response.status_code}"
            raise not_prefect(where, why) from exc
        raise
    try:
        answer = response.json()
    except ValueError:
        raise not_prefect(where, "its /admin/version answered something other than JSON") from None
    return judge(answer, client.client_version(), where=where)


def judge(answer: Any, client_version: str, *, where: str) -> Server:
    """Judge the body of ``/admin/version`` (already parsed from JSON) against this client.

    Raises:
        IncompatibleServer: ``answer`` is not a version, or the version of Prefect 2 or older.
    """
    server = _version(answer, where)
    if server.major < 3:
        raise IncompatibleServer(
            f"the API at {where} is a Prefect {server} server; flowsubmit needs a Prefect 3 "
            "server (upgrade the server, or point PREFECT_API_URL at a Prefect 3 one)",
            operation="read server version",
        )
    try:
        client = Version(client_version)
    except InvalidVersion:
        client = server
    return Server(version=str(answer), bulk=server >= BULK_SINCE, client_newer=client > server)


def cloud() -> Server:
    """Prefect Cloud: always the newest server, so every route is there."""
    return Server(version="cloud", bulk=True, client_newer=False)


def _version(answer: Any, where: str) -> Version:
    if isinstance(answer, str):
        try:
            return Version(answer)
        except InvalidVersion:
            pass
    raise not_prefect(where, f"its /admin/version answered {str(answer)[:80]!r}")


def not_prefect(where: str, why: str) -> IncompatibleServer:
    """The refusal of an API that is not Prefect's."""
    return IncompatibleServer(
        f"the API at {where} is not a Prefect server ({why}); "
        "PREFECT_API_URL must be a Prefect 3 server's API, e.g. http://HOST:4200/api",
        operation="read server version",
    )
