"""``until(...)``: a wait for a condition the code under test reaches by itself."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

#: How long a test waits for an outcome before it fails: a safety net, not a timing claim
#: (those live in bench/).
PATIENCE_S = 60.0


async def until(predicate: Callable[[], object], what: str, timeout_s: float = PATIENCE_S) -> None:
    """Poll ``predicate`` until it is truthy; after ``timeout_s``, fail naming ``what``."""
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                if predicate():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"waited {timeout_s:g} s for {what}") from None
