"""flowsubmit: fan out job files into Prefect deployment runs, and fan their final states back in."""

from __future__ import annotations

from flowsubmit.errors import (
    ClaimLost,
    ClosedError,
    FlowsubmitError,
    GatewayError,
    JobRejected,
    PermanentGatewayError,
    TransientGatewayError,
    WaitTimeout,
)

__all__ = [
    "ClaimLost",
    "ClosedError",
    "FlowsubmitError",
    "GatewayError",
    "JobRejected",
    "PermanentGatewayError",
    "TransientGatewayError",
    "WaitTimeout",
]
