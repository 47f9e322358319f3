"""flowsubmit: fan out job files into Prefect deployment runs, and fan their final states back in."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowsubmit.errors import (
    AuthenticationError,
    ClaimLost,
    ClosedError,
    FlowsubmitError,
    GatewayError,
    JobRejected,
    PermanentGatewayError,
    SettingsError,
    TransientGatewayError,
    WaitTimeout,
)

if TYPE_CHECKING:
    from flowsubmit.submission import FlowSubmission, flow_submitter, run_batch

__all__ = [
    "AuthenticationError",
    "ClaimLost",
    "ClosedError",
    "FlowSubmission",
    "FlowsubmitError",
    "GatewayError",
    "JobRejected",
    "PermanentGatewayError",
    "SettingsError",
    "TransientGatewayError",
    "WaitTimeout",
    "flow_submitter",
    "run_batch",
]

# The library API imports Prefect, whose settings are read at import: `import flowsubmit`
# stays cheap (the CLI imports it before Prefect's environment is set), and these
# names are imported on first use.
_LAZY = frozenset({"FlowSubmission", "flow_submitter", "run_batch"})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from flowsubmit import submission

        value = getattr(submission, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'flowsubmit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
