"""flowsubmit: fan out job files into Prefect deployment runs, and fan their final states back in.

The package is a stack of rooms; each imports only the rooms below it
(``tests/test_layout.py`` checks it), and each room's ``__init__`` is its map:

=============  ==================================================================
``cli``        the ``flowsubmit`` command
``local``      Prefect servers and flows for the demo, tests and benchmarks
``service``    the daemon: intake, one job's life, the composition root
``submission`` the library (``flow_submitter``, ``run_batch``) and its log lines
``ops``        heartbeats, status, retention, systemd notify, ``/metrics``
``engine``     one set of runs followed to its end: run-sets, the tracker, results
``gateway``    everything that talks to Prefect (the only importer of prefect/httpx)
``queue``      the queue directory's file protocol and the job journal
``settings``   the one settings object
``jobs``       the job file, its plan of runs, and what producers may ask for
foundation     ``errors``, ``redaction``, ``_types``, ``_aio``, ``_wording``, ``logs``
               (the only door to structlog), ``metrics`` (the registry)
=============  ==================================================================
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from flowsubmit.errors import (
    AuthenticationError,
    ClaimLost,
    ClosedError,
    FlowsubmitError,
    GatewayError,
    IncompatibleServer,
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
    "IncompatibleServer",
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
