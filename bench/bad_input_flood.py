"""A flood of bad files: how long until all are judged, how long good jobs wait, and the daemon's memory.

Run: ``.venv/bin/python bench/bad_input_flood.py``. Prints one line per scenario; asserts nothing.

One local SQLite-backed server with the test flows. Good jobs target the never-served
``driven`` deployment, and ``max_concurrent_jobs`` is above their number, so a good
job's delay (drop -> ``job.claimed``) measures the judging, not slot capacity. Each
scenario drops its files at once (written to ``tmp/``, then renamed into ``incoming/``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

from flowsubmit.local.localserver import LocalServer, served_flows

ROOT = Path(__file__).resolve().parent.parent
DRIVEN = "driven/driven-deployment"
BAD = [b"junk", b"", b'{"deployment": "a/b", "runz": [{}]}', b"[" * 50, b'{"id": "a/b"}']


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def scenario(server: LocalServer, work: Path, total: int, good: int) -> str:
    queue = work / f"q-{total}"
    log_path = work / f"daemon-{total}.log"
    env = server.env(
        FLOWSUBMIT_MAX_CONCURRENT_JOBS=str(good + 10),
        FLOWSUBMIT_RESCAN_INTERVAL_S="0.5",
        FLOWSUBMIT_RUN_TAG=f"flood-{total}",
    )
    with open(log_path, "wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "flowsubmit.cli", "run", "--queue", str(queue)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        while b"service.ready" not in log_path.read_bytes():
            time.sleep(0.1)
        every = total // good
        for i in range(total):
            data = (
                json.dumps({"id": f"g{total}-{i}", "deployment": DRIVEN, "runs": [{}]}).encode()
                if i % every == 0
                else BAD[i % len(BAD)]
            )
            (queue / "tmp" / f"{i:05d}.json").write_bytes(data)
        dropped = time.time()
        for name in sorted(os.listdir(queue / "tmp")):
            os.rename(queue / "tmp" / name, queue / "incoming" / name)
        while os.listdir(queue / "incoming"):
            time.sleep(0.2)
        rss = _peak_rss_mib(daemon.pid)
    finally:
        daemon.terminate()
        daemon.wait(30)
    lines = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    at = {
        e: [
            datetime.fromisoformat(x["timestamp"]).timestamp() - dropped
            for x in lines
            if x["event"] == e
        ]
        for e in ("job.claimed", "job.rejected")
    }
    claims = sorted(at["job.claimed"])
    last = max(claims + at["job.rejected"])
    return (
        f"{total:5d} files ({total - len(claims)} bad, {len(claims)} good): all judged in {last:5.1f} s; "
        f"good claimed after p50 {statistics.median(claims):.2f} s, max {claims[-1]:.2f} s; "
        f"daemon peak RSS {rss:.0f} MiB"
    )


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="flowsubmit-flood-") as tmp:
        work = Path(tmp)
        (work / "prefect").mkdir()
        server = LocalServer(home=work / "prefect")
        server.start()
        try:
            with served_flows(server, "tests.support.flows"):
                for total, good in ((50, 50), (5000, 50)):
                    print(scenario(server, work, total, good), flush=True)
        finally:
            server.close()


if __name__ == "__main__":
    main()
