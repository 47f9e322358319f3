"""The job's keyed Markdown artifact ``flowsubmit-<job id>`` in Prefect's UI.

Created through the client's API call (not ``create_markdown_artifact``, which warns
outside a flow run); a new version of the same key each time a job of that id ends.
A failure is logged (``artifacts.create_failed``), never raised.
"""

from __future__ import annotations

import asyncio
import re

from prefect.client.schemas.actions import ArtifactCreate

from flowsubmit.gateway.client import Gateway
from flowsubmit.logs import get_logger

__all__ = ["artifact_key", "create_job_artifact"]

log = get_logger("flowsubmit.artifacts")

#: How long creating the artifact may take.
CREATE_TIMEOUT_S = 30.0


def artifact_key(job_id: str) -> str:
    """``flowsubmit-<job id>`` spelled as a key may be: lowercase letters, digits and dashes."""
    return "flowsubmit-" + re.sub(r"[^a-z0-9]+", "-", job_id.lower()).strip("-")


async def create_job_artifact(
    gateway: Gateway, job_id: str, markdown: str, description: str
) -> bool:
    """Create the job's artifact; True once created, False (logged) on any failure."""
    artifact = ArtifactCreate(
        key=artifact_key(job_id), type="markdown", data=markdown, description=description
    )
    try:
        async with asyncio.timeout(CREATE_TIMEOUT_S):
            await gateway.client.create_artifact(artifact)
    except Exception as exc:  # an artifact is never worth a job: every failure is logged
        log.warning(
            "artifacts.create_failed", key=artifact.key, error=f"{type(exc).__name__}: {exc}"
        )
        return False
    return True
