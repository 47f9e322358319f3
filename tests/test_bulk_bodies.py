"""The bulk route's items: plain JSON goes as given, anything else through Prefect's own model (no server)."""

from __future__ import annotations

import datetime
import math
from typing import Any

import pytest
from prefect.client.schemas.actions import DeploymentFlowRunCreate
from pydantic import BaseModel

from flowsubmit._types import RunRequest
from flowsubmit.gateway.convert import create_bodies, create_fields, is_json


class Point(BaseModel):
    x: int


def _prefects(request: RunRequest) -> dict[str, Any]:
    """The item as Prefect's client builds it (``DeploymentFlowRunCreate``), without its state."""
    return DeploymentFlowRunCreate(**create_fields(request)).model_dump(
        mode="json", exclude_unset=True
    )


@pytest.mark.parametrize(
    "request_",
    [
        RunRequest("k/0", {"table": "a", "n": 2, "ratio": 0.5, "on": True, "none": None}),
        RunRequest(
            "k/1",
            {"nested": {"list": [1, "two", {"three": [3.0]}]}, "empty": {}},
            tags=("flowsubmit", "flowsubmit-job:j"),
            job_variables={"env": {"A": "1"}, "cpu": 2},
            work_queue_name="batch",
            name="run-1",
        ),
        RunRequest("k/2", {}),
    ],
)
def test_plain_json_parameters_make_the_item_prefects_model_makes(request_: RunRequest) -> None:
    """A daemon job's parameters (plain JSON) skip Prefect's model, and the item is the same."""
    assert is_json(request_.parameters)
    (body,) = create_bodies([request_])
    assert body.pop("state")["type"] == "SCHEDULED"
    assert body == _prefects(request_)


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        (datetime.date(2026, 12, 6), "2026-12-06"),
        (Point(x=1), {"x": 1}),
        ((1, 2), [1, 2]),
    ],
)
def test_values_json_has_no_type_for_go_through_prefects_model(value: Any, sent: Any) -> None:
    """A library caller's date, pydantic model or tuple is converted as Prefect's client converts it."""
    request = RunRequest("k/3", {"value": value, "plain": 1})
    assert not is_json(request.parameters)
    (body,) = create_bodies([request])
    assert body["parameters"] == {"value": sent, "plain": 1}
    body.pop("state")
    assert body == _prefects(request)


@pytest.mark.parametrize(
    "value", [math.nan, math.inf, {1: "key not a str"}, [object()], True.__class__]
)
def test_what_is_not_plain_json_is_told(value: Any) -> None:
    """Non-finite floats, non-str keys, objects and types are not plain JSON."""
    assert not is_json({"value": value})
