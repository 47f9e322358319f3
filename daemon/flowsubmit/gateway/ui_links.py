"""Links into Prefect's UI, when the operator told where it is (``PREFECT_UI_URL``).

Prefect infers a UI address from the API's when it is not set; flowsubmit writes a
link only from an address set explicitly, since a proxy often serves the UI elsewhere.
"""

from __future__ import annotations

from prefect.settings import get_current_settings

__all__ = ["run_ui_prefix", "run_ui_url"]


def run_ui_url(flow_run_id: str) -> str | None:
    """The flow run's page in the UI, or None when ``PREFECT_UI_URL`` is not set."""
    prefix = run_ui_prefix()
    return None if prefix is None else prefix + flow_run_id


def run_ui_prefix() -> str | None:
    """What a flow run's id completes into its page in the UI (read once for many runs), or None."""
    settings = get_current_settings()
    if "ui_url" not in settings.model_fields_set or not settings.ui_url:
        return None
    return f"{settings.ui_url.rstrip('/')}/runs/flow-run/"
