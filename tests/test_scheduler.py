"""The create scheduler's pure logic: turn order by priority and fairness, and batches per free slot."""

from __future__ import annotations

import asyncio
import random

import pytest

from flowsubmit._types import Deployment, RunRequest
from flowsubmit.errors import ClosedError
from flowsubmit.gateway.scheduler import RELIEF_EVERY, CreateScheduler, TurnOrder

Item = tuple[str, int]


def _fill(
    order: TurnOrder[Item], lane: str, runs: int, priority: int = 0, group: str = "d"
) -> None:
    for i in range(runs):
        order.add(lane, priority, group, (lane, i))


def _turns(order: TurnOrder[Item], limit: int = 100) -> list[tuple[str, int]]:
    """Every turn until nothing waits, as (lane, runs) for each lane in the batch."""
    turns = []
    while (turn := order.next_batch(limit)) is not None:
        lanes = [lane for lane, _ in turn[1]]
        turns.extend((lane, lanes.count(lane)) for lane in dict.fromkeys(lanes))
    return turns


def test_two_busy_jobs_alternate_full_batches() -> None:
    """Two jobs of one priority, both with runs waiting, take turns, each turn a full batch."""
    order: TurnOrder[Item] = TurnOrder()
    _fill(order, "a", 300)
    _fill(order, "b", 250)
    assert _turns(order) == [
        ("a", 100),
        ("b", 100),
        ("a", 100),
        ("b", 100),
        ("b", 50),  # its batch ends first on the clock (250 < 300); no newcomer fills it
        ("a", 100),
    ]
    assert len(order) == 0


def test_a_job_that_arrives_while_a_big_one_submits_gets_the_next_turn() -> None:
    """A small job queued after a big job's first batches went out is served in the very next turn."""
    order: TurnOrder[Item] = TurnOrder()
    _fill(order, "big", 3000)
    assert _turns_taken(order, 5) == [("big", 100)] * 5
    _fill(order, "one", 1)
    _fill(order, "twenty", 20)
    # Their first turns share one call, with none of the big job's runs; then it goes on.
    assert _turns_taken(order, 2) == [("one", 1), ("twenty", 20), ("big", 100)]


def _turns_taken(order: TurnOrder[Item], count: int) -> list[tuple[str, int]]:
    """The next ``count`` batches, as (lane, runs) for each lane in them."""
    turns = []
    for _ in range(count):
        turn = order.next_batch(100)
        assert turn is not None
        lanes = [lane for lane, _ in turn[1]]
        turns.extend((lane, lanes.count(lane)) for lane in dict.fromkeys(lanes))
    return turns


def test_higher_priority_goes_first_and_lower_priority_gets_one_turn_in_ten() -> None:
    """Strict priority between levels, except that waiting lower priority gets every tenth turn."""
    order: TurnOrder[Item] = TurnOrder()
    _fill(order, "low", 300, priority=0)
    _fill(order, "high", 3000, priority=5)
    lanes = [lane for lane, _ in _turns(order)]
    assert lanes[: RELIEF_EVERY * 3] == (["high"] * (RELIEF_EVERY - 1) + ["low"]) * 3
    assert lanes[RELIEF_EVERY * 3 :] == ["high"] * (30 - 3 * (RELIEF_EVERY - 1))


def test_jobs_that_have_not_had_a_turn_share_one_call() -> None:
    """Ten 1-run jobs of one deployment go out in one batch, and a second deployment's job in its own."""
    order: TurnOrder[Item] = TurnOrder()
    for n in range(10):
        _fill(order, f"job{n}", 1)
    _fill(order, "other", 1, group="d2")
    first = order.next_batch(100)
    assert first is not None and first[0] == "d"
    assert sorted(first[1]) == [(f"job{n}", 0) for n in range(10)]
    assert order.next_batch(100) == ("d2", [("other", 0)])


def test_a_batch_holds_runs_of_one_deployment() -> None:
    """One turn sends runs of one deployment (the bulk route's unit); the next turn sends the next one's."""
    order: TurnOrder[Item] = TurnOrder()
    _fill(order, "a", 3, group="d1")
    _fill(order, "a", 2, group="d2")
    _fill(order, "a", 1, group="d1")
    batches = []
    while (turn := order.next_batch(100)) is not None:
        batches.append((turn[0], [i for _, i in turn[1]]))
    assert batches == [("d1", [0, 1, 2, 0]), ("d2", [0, 1])]


def test_no_job_waits_behind_more_than_two_batches_of_another() -> None:
    """Random arrivals at one priority: while a job waits, no other job is given more than two batches."""
    rng = random.Random(13)
    order: TurnOrder[Item] = TurnOrder()
    given: dict[str, int] = {}
    waiting_since: dict[str, dict[str, int]] = {}
    for step in range(400):
        if rng.random() < 0.3:
            lane = f"job{rng.randrange(6)}"
            _fill(order, lane, rng.choice([1, 5, 50, 300]))
            waiting_since.setdefault(lane, dict(given))
        turn = order.next_batch(50)
        if turn is None:
            continue
        for lane, _ in turn[1]:
            given[lane] = given.get(lane, 0) + 1
        for lane in {lane for lane, _ in turn[1]}:
            for other, snapshot in waiting_since.items():
                if other != lane:
                    assert given[lane] - snapshot.get(lane, 0) <= 2 * 50, (step, lane, other)
            waiting_since.pop(lane, None)
            if lane in order._lanes:
                waiting_since[lane] = dict(given)


def _request(lane: str, i: int, priority: int = 0) -> RunRequest:
    return RunRequest(f"{lane}/{i}", {}, lane=lane, priority=priority)


async def _settle() -> None:
    """Let every ready task and callback run (a few loop iterations, no timer)."""
    for _ in range(10):
        await asyncio.sleep(0)


class _SlowSender:
    """A sender that answers a batch only when told to; records what it was given."""

    def __init__(self) -> None:
        self.sent: list[list[str]] = []
        self._gates: list[asyncio.Event] = []

    async def __call__(
        self, deployment: Deployment, requests: list[RunRequest]
    ) -> list[str | Exception]:
        self.sent.append([r.idempotency_key for r in requests])
        gate = asyncio.Event()
        self._gates.append(gate)
        await gate.wait()
        return [f"run-{r.idempotency_key}" for r in requests]

    def release_first(self) -> None:
        self._gates.pop(0).set()


async def test_a_batch_is_formed_only_when_a_slot_is_free() -> None:
    """With one slot busy on a big job, a small job's create is the next batch sent, before the big job's next one."""
    sender = _SlowSender()
    scheduler = CreateScheduler(sender, capacity=lambda: 1, batch_size=lambda: 100)
    deployment = Deployment(id="d", name="flow/d")
    big = [
        asyncio.create_task(scheduler.create(deployment, _request("big", i))) for i in range(250)
    ]
    await _settle()
    assert [len(b) for b in sender.sent] == [100]
    small = asyncio.create_task(scheduler.create(deployment, _request("small", 0)))
    await _settle()
    sender.release_first()
    await _settle()
    assert sender.sent[1] == ["small/0"]  # its own short call: no big runs padded in
    sender.release_first()
    assert await small == "run-small/0"
    for _ in range(2):
        await _settle()
        sender.release_first()
    assert await asyncio.gather(*big) == [f"run-big/{i}" for i in range(250)]
    assert [len(b) for b in sender.sent] == [100, 1, 100, 50]


async def test_close_fails_the_creates_still_waiting() -> None:
    """Closing the scheduler fails every create not yet answered with ClosedError, and refuses new ones."""
    sender = _SlowSender()
    scheduler = CreateScheduler(sender, capacity=lambda: 1, batch_size=lambda: 2)
    deployment = Deployment(id="d", name="flow/d")
    waiting = [
        asyncio.create_task(scheduler.create(deployment, _request("a", i))) for i in range(5)
    ]
    await _settle()
    scheduler.close()
    results = await asyncio.gather(*waiting, return_exceptions=True)
    assert [type(r) for r in results] == [ClosedError] * 5
    with pytest.raises(ClosedError):
        await scheduler.create(deployment, _request("a", 9))
