"""The exceptions flowsubmit raises, and nothing else.

::

    FlowsubmitError
      JobRejected              bad JSON, schema or field: the file goes to rejected/ with NAME.error.json
      GatewayError
        TransientGatewayError  network, timeouts, 429, 5xx: retried with backoff and jitter
          ContentionError      the server took the call but refused an item for database
                               contention ("database is locked"): sent again soon
          AuthenticationError  401/403: the client's credentials are refused; never a verdict on a job
        PermanentGatewayError  unknown deployment, refused parameters: the job fails clearly
      ClaimLost                another daemon renamed the file first
      WaitTimeout              FlowSubmission.wait() ran out of time; carries the partial results
      ClosedError              a resource was used after it was closed
      SettingsError            a setting (flag, environment or TOML file) is invalid, or one
                               flowsubmit needs is missing (PREFECT_API_URL): nothing starts
"""

from __future__ import annotations

from flowsubmit.redaction import redact_text

__all__ = [
    "ClaimLost",
    "AuthenticationError",
    "ClosedError",
    "ContentionError",
    "FlowsubmitError",
    "GatewayError",
    "JobRejected",
    "PermanentGatewayError",
    "SettingsError",
    "TransientGatewayError",
    "WaitTimeout",
]


class FlowsubmitError(Exception):
    """Base class of every error flowsubmit raises on purpose."""


class JobRejected(FlowsubmitError):
    """A job file cannot be accepted; raised by the job parser and by pre-submit checks.

    ``reason`` and ``hint`` are masked when the rejection is made (a ``password=...``
    the file spelled out loses its value), so the error file, the ``job.rejected`` log
    line and the command line's message never echo a secret the producer wrote.
    """

    def __init__(
        self, reason: str, *, file: str = "", field: str | None = None, hint: str | None = None
    ) -> None:
        self.reason = redact_text(reason)
        self.file = file
        self.field = field
        self.hint = None if hint is None else redact_text(hint)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        """One line naming the file, the field and what was wrong."""
        where = f"{self.file}: " if self.file else ""
        field = f"field {self.field!r}: " if self.field else ""
        hint = f" ({self.hint})" if self.hint else ""
        return f"{where}{field}{self.reason}{hint}"

    def with_file(self, file: str) -> JobRejected:
        """Return the same rejection naming ``file``."""
        return JobRejected(self.reason, file=file, field=self.field, hint=self.hint)

    def as_dict(self) -> dict[str, str | None]:
        """The body of ``NAME.error.json``."""
        return {"file": self.file, "reason": self.reason, "field": self.field, "hint": self.hint}


class GatewayError(FlowsubmitError):
    """A call to Prefect failed; ``operation`` names the call."""

    def __init__(
        self,
        message: str,
        *,
        operation: str = "",
        deployment: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        self.operation = operation
        self.deployment = deployment
        self.retry_after_s = retry_after_s
        super().__init__(message)


class TransientGatewayError(GatewayError):
    """Prefect could not be reached or was busy; the same call may succeed later."""


class ContentionError(TransientGatewayError):
    """The server answered, but refused an item for database contention ("database is locked").

    Not an outage: the server is busy with another writer for an instant. The item is
    sent again at once when the same call created others, after a short wait otherwise.
    """


class AuthenticationError(TransientGatewayError):
    """Prefect refused the client's credentials (HTTP 401/403): a configuration error of the client.

    Never a verdict on a job: it is waited out like an outage (retried within
    ``prefect_outage_tolerance_s``), and the daemon claims nothing while it lasts.
    """


class PermanentGatewayError(GatewayError):
    """Prefect refused the call for a reason that retrying cannot fix."""


class ClaimLost(FlowsubmitError):
    """Another daemon claimed or holds the job first; not an error for the user."""


class WaitTimeout(FlowsubmitError):
    """``wait()`` timed out; ``results`` holds the runs that did finish (run id -> state name)."""

    def __init__(self, message: str, *, results: dict[str, str], pending: list[str]) -> None:
        self.results = results
        self.pending = pending
        super().__init__(message)


class ClosedError(FlowsubmitError):
    """A gateway, tracker or submission was used after ``aclose()``."""


class SettingsError(FlowsubmitError):
    """A setting is invalid; ``source`` names where it came from, ``reason`` what is allowed.

    ``source`` is the flag (``--log-format``), the variable (``FLOWSUBMIT_LOG_FORMAT``)
    or the file and its key (``/etc/flowsubmit.toml: log_format``).
    """

    def __init__(self, source: str, reason: str, *, hint: str | None = None) -> None:
        self.source = source
        self.reason = reason
        self.hint = hint
        super().__init__(f"{source}: {reason}")


class IncompatibleServer(PermanentGatewayError):
    """The API at ``PREFECT_API_URL`` is not a Prefect 3 server (a Prefect 2 server, or
    another API altogether): nothing is claimed or created against it."""


class LocksUnavailable(FlowsubmitError):
    """The queue's filesystem cannot lock files across its clients, so claims would not be
    exclusive: the daemon claims nothing and stops, naming the filesystem."""
