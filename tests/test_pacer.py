"""The create-call limits of ``gateway/pacer.py``, as pure logic (no server): the contention limit and the call size."""

from __future__ import annotations

import structlog

from flowsubmit.gateway.pacer import CallLimit, CallSize


def test_calls_start_at_one_and_open_up_after_a_short_clean_streak() -> None:
    limit = CallLimit(3, recover_after=50, open_after=2)
    with structlog.testing.capture_logs() as lines:
        assert limit.limit == 1
        limit.clean()
        assert limit.limit == 1
        limit.clean()
        assert limit.limit == 2
        limit.clean()
        limit.clean()
        assert limit.limit == 3
        limit.clean()
        limit.clean()
        assert limit.limit == 3  # never above the maximum
    assert [(line["previous"], line["limit"]) for line in lines] == [(1, 2), (2, 3)]
    assert lines[0]["reason"] == "2 calls in a row without contention"


def test_contention_brings_calls_down_to_one_and_a_clean_streak_back_up() -> None:
    limit = CallLimit(3, recover_after=4, open_after=1)
    limit.clean()
    limit.clean()
    assert limit.limit == 3  # opened
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


def test_call_size_follows_the_servers_speed_between_its_bounds() -> None:
    size = CallSize(100, target_s=1.0, minimum=10)
    assert size.size == 10  # nothing learnt yet: a short first call
    size.observe(3.0, 0)  # all refused: says nothing of the speed
    assert size.size == 10
    size.observe(3.0, 100)  # 33 runs/s: a call of one second carries 33
    assert size.size == 33
    for _ in range(20):
        size.observe(0.5, 100)  # 200 runs/s
    assert size.size == 100  # never above the maximum
    for _ in range(20):
        size.observe(10.0, 10)  # 1 run/s
    assert size.size == 10  # never below the minimum
