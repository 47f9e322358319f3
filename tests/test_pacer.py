"""The create-call limits of ``pacer.py``, as pure logic (no server): the contention limit."""

from __future__ import annotations

import structlog

from flowsubmit.pacer import CallLimit


def test_contention_brings_calls_down_to_one_and_a_clean_streak_back_up() -> None:
    limit = CallLimit(3, recover_after=4)
    with structlog.testing.capture_logs() as lines:
        limit.clean()
        assert limit.limit == 3  # nothing to recover
        limit.contended()
        assert limit.limit == 1
        limit.contended()  # already one: no new line
        for _ in range(3):
            limit.clean()
        assert limit.limit == 1
        limit.clean()  # the fourth in a row
        assert limit.limit == 2
        for _ in range(3):
            limit.clean()
        limit.contended()  # the streak is broken before it reaches four
        assert limit.limit == 1
    changes = [(line["previous"], line["limit"]) for line in lines]
    assert changes == [(3, 1), (1, 2), (2, 1)]
    assert {line["event"] for line in lines} == {"gateway.call_limit"}


def test_a_limit_of_one_never_changes() -> None:
    limit = CallLimit(1, recover_after=1)
    with structlog.testing.capture_logs() as lines:
        limit.contended()
        limit.clean()
        limit.clean()
    assert limit.limit == 1
    assert lines == []
