"""Prefect's errors as flowsubmit's, and the retry policy around one operation.

Owns the mapping of what a call to Prefect raised (httpx, Prefect's exceptions, an OS
error) to ``errors``: transient (retried), permanent, an authentication error; and
``Retrying``, the tenacity policy that retries a transient failure until the outage
tolerance is spent (the budget is stated in ``client``'s docstring). The ``Gateway``
wraps every call in both.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import Iterator

import httpx
from prefect.exceptions import ObjectNotFound
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_delay
from tenacity.wait import wait_exponential, wait_random

from flowsubmit import metrics
from flowsubmit.errors import (
    AuthenticationError,
    ContentionError,
    GatewayError,
    PermanentGatewayError,
    TransientGatewayError,
)
from flowsubmit.gateway.connection import display_url
from flowsubmit.gateway.diagnosis import NOT_AN_API_HINT, is_not_a_prefect_route
from flowsubmit.logs import get_logger

__all__ = [
    "ATTEMPT_FLOOR_S",
    "CONTENTION_RETRIES_ROUTINE",
    "TRANSIENT_DB_ERROR",
    "Retrying",
    "retry_after",
    "translate_errors",
]

# The gateway's logger: ``gateway.retrying`` is the gateway's line wherever it is made.
log = get_logger("flowsubmit.gateway")

#: The least time one attempt of a retried read or cancel is given, even when the
#: outage tolerance is nearly spent (``Retrying.bound``).
ATTEMPT_FLOOR_S = 3.0
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Credentials refused: a configuration error of this client, never a verdict on what it asked.
_AUTH_STATUS = frozenset({401, 403})
#: What the server says when another writer held the database: worth sending again.
TRANSIENT_DB_ERROR = re.compile(
    r"database is locked|OperationalError|deadlock|could not serialize|timed? ?out", re.I
)


@contextlib.contextmanager
def translate_errors(
    operation: str, deployment: str | None = None, not_found: str | None = None
) -> Iterator[None]:
    """``_translate`` the errors of a call to Prefect, counting each (``flowsubmit_prefect_errors_total``)."""
    try:
        with _translate(operation, deployment, not_found):
            yield
    except GatewayError as exc:
        metrics.count_prefect_error(exc)
        raise


@contextlib.contextmanager
def _translate(
    operation: str, deployment: str | None = None, not_found: str | None = None
) -> Iterator[None]:
    """Map foreign exceptions to ``errors.py``: transport and 5xx are transient, 401/403 an
    authentication error (waited out like an outage), other 4xx permanent.

    ``not_found`` replaces ``operation`` in the message of a 404 that is Prefect's own
    (naming the object); a 404 of a route the server does not have says the URL is wrong.
    """
    try:
        yield
    except ObjectNotFound as exc:
        # Prefect's ObjectNotFound prints as "None"; the detail lives in its cause.
        http_exc = exc.http_exc if isinstance(exc.http_exc, httpx.HTTPStatusError) else None
        if http_exc is not None and is_not_a_prefect_route(http_exc.response):
            raise _not_an_api(http_exc, operation, deployment) from exc
        detail = _http_detail(http_exc) if http_exc is not None else "not found"
        raise PermanentGatewayError(
            f"{not_found or operation}: {detail}", operation=operation, deployment=deployment
        ) from exc
    except httpx.HTTPStatusError as exc:
        detail = _http_detail(exc)
        status = exc.response.status_code
        if status in _AUTH_STATUS:
            raise AuthenticationError(
                f"{operation}: Prefect at {display_url(str(exc.request.url.copy_with(query=None)))}"
                f" refused the credentials ({detail}); "
                "check PREFECT_API_AUTH_STRING or PREFECT_API_KEY",
                operation=operation,
                deployment=deployment,
            ) from exc
        if status == 404 and is_not_a_prefect_route(exc.response):
            raise _not_an_api(exc, operation, deployment) from exc
        cls = TransientGatewayError if status in _TRANSIENT_STATUS else PermanentGatewayError
        what = not_found if status == 404 and not_found else operation
        raise cls(
            f"{what}: {detail}",
            operation=operation,
            deployment=deployment,
            retry_after_s=retry_after(exc.response),
        ) from exc
    except (httpx.TransportError, OSError, TimeoutError) as exc:
        raise TransientGatewayError(
            f"{operation}: Prefect unreachable ({type(exc).__name__}: {exc})",
            operation=operation,
            deployment=deployment,
        ) from exc


def _not_an_api(
    exc: httpx.HTTPStatusError, operation: str, deployment: str | None
) -> PermanentGatewayError:
    """A 404 of a route the server does not have: the URL is wrong, not the object asked for."""
    url = display_url(str(exc.request.url.copy_with(query=None)))
    return PermanentGatewayError(
        f"{operation}: HTTP 404 from {url}: {NOT_AN_API_HINT}",
        operation=operation,
        deployment=deployment,
    )


def _http_detail(exc: httpx.HTTPStatusError) -> str:
    try:
        body = exc.response.json()
        # Prefect answers {"detail": ...}; its auth middleware {"exception_message": ...}.
        if isinstance(body, dict):
            detail = body.get("detail", body.get("exception_message", body))
        else:
            detail = body
    except ValueError:
        detail = exc.response.text[:500]
    return f"HTTP {exc.response.status_code}: {detail}"


def retry_after(response: httpx.Response) -> float | None:
    try:
        return float(response.headers["Retry-After"])
    except (KeyError, ValueError):
        return None


# Exponential waits with jitter, built from ``wait_exponential`` and ``wait_random``:
# ``wait_exponential_jitter`` names its first wait ``initial`` in older tenacity releases
# and newer ones (9.2 here) warn of that name, an import error under ``-W error``.

#: Between attempts while Prefect is unreachable: 0.5 s doubling to 30 s, plus up to 1 s.
_OUTAGE_WAIT = wait_exponential(multiplier=0.5, max=30.0) + wait_random(0, 1.0)

#: Another writer held the database for an instant: try again soon, not after an outage's backoff.
_CONTENTION_WAIT = wait_exponential(multiplier=0.1, max=2.0) + wait_random(0, 0.1)


def _backoff(retry_state: RetryCallState) -> float:
    """The outage backoff, but never shorter than the server's ``Retry-After``; short
    (``_CONTENTION_WAIT``) when the server answered and only contended."""
    outcome = retry_state.outcome
    exc = outcome.exception() if outcome is not None else None
    if isinstance(exc, ContentionError):
        return float(_CONTENTION_WAIT(retry_state))
    backoff = float(_OUTAGE_WAIT(retry_state))
    retry_after = getattr(exc, "retry_after_s", None)
    return max(backoff, retry_after) if retry_after else backoff


class Retrying(AsyncRetrying):
    """The retry policy of one operation, which ends within about its outage tolerance.

    The backoff never sleeps past the tolerance (the last attempt starts when it is
    spent), no attempt starts after it, and ``bound()`` ends an attempt at the tolerance
    (at least ``ATTEMPT_FLOOR_S`` after it began). Without that bound one attempt alone
    can outlast the tolerance: httpx retries a refused connection 3 times (1.5 s),
    Prefect's client retries a request 5 times with 2**n s backoff once it has
    connected, and a connect to a silent host waits out ``PREFECT_API_REQUEST_TIMEOUT``.
    """

    def __init__(self, tolerance_s: float) -> None:
        super().__init__(
            retry=retry_if_exception_type(TransientGatewayError),
            wait=self._wait,
            stop=stop_after_delay(tolerance_s),
            before_sleep=_log_retry,
            reraise=True,
        )
        self.tolerance_s = tolerance_s
        self._deadline: float | None = None

    def _wait(self, retry_state: RetryCallState) -> float:
        """The backoff, cut short where the tolerance is spent."""
        backoff = _backoff(retry_state)
        spent_s = retry_state.seconds_since_start or 0.0
        return max(0.0, min(backoff, self.tolerance_s - spent_s))

    def bound(self) -> asyncio.Timeout:
        """A timeout for one attempt (its ``TimeoutError`` is transient, like an outage)."""
        now = asyncio.get_running_loop().time()
        if self._deadline is None:
            self._deadline = now + self.tolerance_s
        return asyncio.timeout_at(max(self._deadline, now + ATTEMPT_FLOOR_S))


#: Retries of one call refused for database contention that are routine (``info``); the
#: next one is a ``warning``: the server is contended for longer than an instant.
CONTENTION_RETRIES_ROUTINE = 3


def _log_retry(state: RetryCallState) -> None:
    """``gateway.retrying``: a warning, but ``info`` for the first few contention retries."""
    exc = state.outcome.exception() if state.outcome else None
    operation, attempt = getattr(exc, "operation", None), state.attempt_number
    wait_s, error = round(state.upcoming_sleep, 2), str(exc)
    if isinstance(exc, ContentionError) and attempt <= CONTENTION_RETRIES_ROUTINE:
        log.info(
            "gateway.retrying", operation=operation, attempt=attempt, wait_s=wait_s, error=error
        )
        return
    log.warning(
        "gateway.retrying", operation=operation, attempt=attempt, wait_s=wait_s, error=error
    )
