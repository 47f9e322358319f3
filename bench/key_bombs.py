"""Hostile files beside a good one: how soon another producer's job is claimed, and how long the event loop stalls.

Run: ``.venv/bin/python bench/key_bombs.py [BOMBS] [--uids VICTIM,ATTACKER] [--json]`` (as
root: the files are given to two uids). Prints one line per scenario (a JSON object with
``--json``: tests/test_boundary.py runs it so, in a process of its own); asserts nothing.

The daemon's own intake on a real queue, without Prefect: ``BOMBS`` files of about 1 MiB
of unknown keys from one producer, then one good job from another. The baselines, measured
in the same run: the good job alone, and the bombs under Python's default thread switch
interval rather than the daemon's. Figures: the good job's claim after its drop,
the longest and the 99th-percentile lag of a 10 ms timer on the loop, and the time until
every bomb is rejected.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from flowsubmit.queue.folders import Queue
from flowsubmit.service.intake import SWITCH_INTERVAL_S, CallbackHost, Intake
from flowsubmit.settings import Settings

#: Two producers by uid (no user entry is needed: a producer is a file's owner).
VICTIM_UID, ATTACKER_UID = 60_001, 60_002
GOOD = json.dumps({"deployment": "allowed/etl", "runs": [{}], "id": "nightly"}).encode()


def _bomb() -> bytes:
    document: dict[str, Any] = {"deployment": "allowed/etl", "runs": [{}]}
    document.update({f"k{i}": 0 for i in range(95_000)})
    return json.dumps(document, separators=(",", ":")).encode()


def _drop(queue: Queue, name: str, data: bytes, uid: int) -> None:
    staged = queue.tmp / f"{name}.part"
    staged.write_bytes(data)
    os.chown(staged, uid, uid)
    os.rename(staged, queue.incoming / name)


async def scenario(root: Path, bombs: int, uids: tuple[int, int]) -> dict[str, Any]:
    queue = Queue(root)
    queue.ensure()
    settings = Settings(queue=root, settle_s=0, allowed_deployments=["allowed/*"])
    victim, attacker = uids
    claimed: list[float] = []
    names: list[str] = []
    rejected: list[float] = []
    ended = asyncio.Event()

    def note(times: list[float]) -> None:
        times.append(time.monotonic())
        if claimed and len(rejected) >= bombs:
            ended.set()

    intake = Intake(
        queue,
        settings,
        settings.policy(),
        CallbackHost(
            has_capacity=lambda _: True,
            start=lambda claim, *_: (note(claimed), names.append(claim.job_id), claim.release()),
            rejected=lambda *_: note(rejected),
            stop_recovered=lambda *_: None,
        ),
    )
    data = _bomb()
    for i in range(bombs):
        _drop(queue, f"bomb{i}.json", data, attacker)
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - before - 0.01)

    async def scans() -> None:
        while not stop.is_set():
            await intake.scan(stop.is_set)
            await asyncio.sleep(0.05)

    tasks = [asyncio.create_task(ticker()), asyncio.create_task(scans())]
    await asyncio.sleep(0.2)
    dropped = time.monotonic()
    _drop(queue, "good.json", GOOD, victim)
    await asyncio.wait_for(ended.wait(), 120)
    stop.set()
    await asyncio.gather(*tasks)
    intake.close()
    return {
        "bombs": bombs,
        "switch_interval_s": sys.getswitchinterval(),
        "claimed": names,
        "claimed_after_s": claimed[0] - dropped if claimed else None,
        "rejected": len(rejected),
        "rejected_after_s": max(rejected) - dropped if rejected else None,
        "lag_max_s": max(lags),
        "lag_p99_s": statistics.quantiles(lags, n=100, method="inclusive")[98],
    }


def describe(figures: dict[str, Any]) -> str:
    """One line of figures."""
    rejected = figures["rejected_after_s"]
    return (
        f"switch interval {figures['switch_interval_s'] * 1000:.0f} ms, {figures['bombs']:>3} bombs:"
        f" good job claimed {figures['claimed_after_s']:5.2f} s after its drop; loop lag max"
        f" {figures['lag_max_s'] * 1000:4.0f} ms, p99 {figures['lag_p99_s'] * 1000:4.0f} ms;"
        f" all bombs rejected after {'-' if rejected is None else f'{rejected:.1f} s'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bombs", nargs="?", type=int, default=10)
    parser.add_argument("--uids", default=f"{VICTIM_UID},{ATTACKER_UID}", help="VICTIM,ATTACKER")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    args = parser.parse_args()
    victim, attacker = (int(uid) for uid in args.uids.split(","))
    default = sys.getswitchinterval()
    with tempfile.TemporaryDirectory(prefix="flowsubmit-bombs-") as work:
        for count, interval in (
            (0, SWITCH_INTERVAL_S),
            (args.bombs, default),
            (args.bombs, SWITCH_INTERVAL_S),
        ):
            sys.setswitchinterval(interval)  # the daemon's, and Python's default for comparison
            root = Path(work) / f"q{count}-{interval}"
            figures = asyncio.run(scenario(root, count, (victim, attacker)))
            print(json.dumps(figures) if args.json else describe(figures), flush=True)


if __name__ == "__main__":
    main()
