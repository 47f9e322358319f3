"""What a failed call says about the configured Prefect URL: unreachable, not a Prefect API, or credentials refused.

A wrong ``PREFECT_API_URL`` shows in three ways, and each is named as such, never as the
fault of what was asked for: nothing answers (connection refused, a name that does not
resolve, a TLS failure); something answers but has no such route, a plain ``404 Not
Found`` (a URL without its ``/api``, another service on the port); or Prefect answers and
refuses the credentials (401/403). Prefect's own 404s carry a detail naming the object
(``Deployment not found``): only those say that the object is missing.
"""

from __future__ import annotations

import httpx

__all__ = ["NOT_AN_API_HINT", "health_problem", "is_not_a_prefect_route"]

NOT_AN_API_HINT = "the server answers but is not a Prefect API: does PREFECT_API_URL end in /api?"
#: The detail of a 404 from a route that does not exist (Starlette's, and most servers').
_NO_ROUTE_DETAILS = frozenset({"Not Found", "not found", ""})


def is_not_a_prefect_route(response: httpx.Response) -> bool:
    """True for a 404 that names no Prefect object: the route itself does not exist there."""
    if response.status_code != 404:
        return False
    try:
        body = response.json()
    except ValueError:
        return True  # an HTML or text page: not Prefect's JSON API
    detail = body.get("detail") if isinstance(body, dict) else None
    return not isinstance(detail, str) or detail in _NO_ROUTE_DETAILS


def health_problem(error: BaseException) -> str:
    """The failed health check ``error`` in words that say what is wrong with the URL."""
    if isinstance(error, httpx.HTTPStatusError):
        status, url = error.response.status_code, error.request.url.copy_with(query=None)
        if is_not_a_prefect_route(error.response):
            return f"HTTP 404 from {url}: {NOT_AN_API_HINT}"
        if status in (401, 403):
            return (
                f"HTTP {status} from {url}: the server refuses the credentials; "
                "check PREFECT_API_AUTH_STRING or PREFECT_API_KEY"
            )
        return f"HTTP {status} from {url}"
    if isinstance(error, httpx.TransportError | OSError):
        return (
            f"unreachable ({type(error).__name__}: {error}): nothing answers at that address,"
            " its name does not resolve, or TLS failed"
        )
    return f"{type(error).__name__}: {error}"
