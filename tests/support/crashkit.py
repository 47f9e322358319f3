"""Helpers of the crash and outage tests: a background run driver, server queries, a raw daemon launcher."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.sorting import FlowRunSort
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

from flowsubmit.local.localserver import LocalServer
from tests.support.driver import drive


class BackgroundDriver:
    """Moves every Scheduled run tagged ``tag`` to ``final`` as soon as it appears, in a thread.

    Runs are driven once each; the thread stops on ``close()``. ``server`` points it at a
    server other than the session one (with that server's credentials).
    """

    def __init__(
        self, tag: str, *, server: LocalServer | None = None, concurrency: int = 4
    ) -> None:
        self.tag = tag
        self.server = server
        self.concurrency = concurrency
        self.driven: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"driver-{tag}", daemon=True)
        self._error: BaseException | None = None

    def __enter__(self) -> BackgroundDriver:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop the thread and re-raise what killed it, if anything."""
        self._stop.set()
        self._thread.join(30)
        if self._error is not None:
            raise self._error

    def _main(self) -> None:
        try:
            with client_of(self.server):
                asyncio.run(self._loop())
        except BaseException as exc:  # surfaced by close()
            self._error = exc

    async def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                scheduled = await runs_tagged(self.tag, state=StateType.SCHEDULED)
                fresh = [str(r.id) for r in scheduled if str(r.id) not in self.driven]
                if fresh:
                    await drive(fresh, concurrency=self.concurrency)
                    self.driven.update(fresh)
            except Exception:  # the server may be down in outage tests: try again
                if self.server is None:
                    raise
            await asyncio.sleep(0.2)


@contextmanager
def client_of(server: LocalServer | None) -> Iterator[None]:
    """Prefect clients made inside talk to ``server`` with its credentials (None: the session server)."""
    if server is None:
        yield
        return
    auth = server.client_env.get("PREFECT_API_AUTH_STRING")
    with temporary_settings({PREFECT_API_URL: server.api_url, PREFECT_API_AUTH_STRING: auth}):
        yield


async def runs_tagged(tag: str, *, state: StateType | None = None) -> list[FlowRun]:
    """Every run on the server carrying ``tag`` (optionally only those in ``state``)."""
    state_filter = FlowRunFilterState(type=FlowRunFilterStateType(any_=[state])) if state else None
    found: list[FlowRun] = []
    async with get_client() as client:
        while True:
            page = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(
                    tags=FlowRunFilterTags(all_=[tag]), state=state_filter
                ),
                sort=FlowRunSort.ID_DESC,  # a stable order, so offset paging neither skips nor repeats
                offset=len(found),
                limit=200,
            )
            found.extend(page)
            if len(page) < 200:
                return found


def server_runs(tag: str, server: LocalServer | None = None) -> list[FlowRun]:
    """``runs_tagged`` from synchronous test code."""
    with client_of(server):
        return asyncio.run(runs_tagged(tag))
