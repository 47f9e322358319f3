"""Which Prefect API flowsubmit talks to: the configured one only (never Prefect's temporary server), shown without credentials, and the versions on both ends."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from urllib.parse import urlsplit, urlunsplit

from flowsubmit.errors import SettingsError

__all__ = ["NOT_CONFIGURED", "configured_api_url", "display_url", "version_of", "versions"]

#: Why ``flowsubmit run`` refuses (one line), and what the library raises, without a Prefect API.
NOT_CONFIGURED = (
    "not set: set it in the environment "
    "(export PREFECT_API_URL=http://HOST:4200/api) or in Prefect's profile "
    "(prefect config set PREFECT_API_URL=http://HOST:4200/api); "
    "flowsubmit never starts a temporary Prefect server of its own"
)


def configured_api_url() -> str:
    """The Prefect API URL from the environment or Prefect's profile.

    Prefect's ``get_client()`` starts a temporary ephemeral server in a subprocess when
    ``PREFECT_API_URL`` is empty and its default profile (``ephemeral``) allows it; a
    daemon would then report ready against a database nobody else sees.
    This reads the same setting the same way (``PREFECT_API_URL.value()``: environment,
    then the active profile) and refuses before ``get_client()`` can decide that.

    Raises:
        SettingsError: no URL is configured.
    """
    from prefect.settings import PREFECT_API_URL  # Prefect's settings are read at import

    url = PREFECT_API_URL.value()
    if not url:
        raise SettingsError("PREFECT_API_URL", NOT_CONFIGURED)
    return str(url)


def display_url(url: str) -> str:
    """``url`` without user name or password, fit for a log line."""
    parts = urlsplit(url)
    if parts.hostname is None or "@" not in parts.netloc:
        return url
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))


def version_of(distribution: str) -> str:
    """The installed version of ``distribution`` (``unknown`` when it is not installed)."""
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "unknown"


def versions() -> tuple[str, str]:
    """(flowsubmit's version, the installed Prefect client's version), without importing Prefect."""
    return version_of("flowsubmit"), version_of("prefect")
