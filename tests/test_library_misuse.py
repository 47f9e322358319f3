"""The library refuses a call it cannot serve with one clear error, before it creates anything."""

from __future__ import annotations

import gc
import warnings

import pytest

import flowsubmit


async def test_run_batch_inside_a_running_loop_refuses_clearly() -> None:
    """In async code ``run_batch`` raises a RuntimeError naming ``flow_submitter``; no coroutine is left unawaited."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match=r"use `async with flow_submitter\(deployment\)"):
            flowsubmit.run_batch("etl/etl-deployment", [{"table": 1}])
        gc.collect()
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
