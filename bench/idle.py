"""An idle daemon's CPU: nothing queued, nothing pending, the stream open and healthy.

Run: ``.venv/bin/python bench/idle.py [seconds]`` (120 by default), with
``BENCH_BASELINE`` set to another checkout's ``daemon`` directory to measure that tree
the same way in the same run. Prints a table; asserts nothing.

One embedded SQLite server; each tree's ``flowsubmit run`` (a subprocess, as in
``bench/scale.py``) starts on a queue of its own, is left ``WARM_S`` to open its
stream and do its first checks, then its CPU (utime + stime from ``/proc``) is read
over ``seconds``. The trees run one after the other on the same server, so each
meets the same server; the machine is shared, so a row is one sample.

What an idle daemon does: the queue watcher's thread wakes every
``WATCH_STEP_MS`` (``flowsubmit.queue.watcher``), the heartbeat file is rewritten
once a second, Prefect's health is checked every few seconds and the stream's checks
back off to one a minute. ``bench/scale.py`` measures idle with every run of a big
job pending, where the rolling read adds to this.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.scale import DaemonProcess  # noqa: E402

from flowsubmit.local.localserver import LocalServer  # noqa: E402

WARM_S = 30.0


async def idle_pct(daemon_dir: str, env: dict[str, str], seconds: float) -> float:
    """Percent of a core the tree at ``daemon_dir`` uses idle over ``seconds``."""
    work = Path(tempfile.mkdtemp(prefix="flowsubmit-idle-"))
    env = {**env, "PYTHONPATH": os.pathsep.join([daemon_dir, str(ROOT)])}
    daemon = DaemonProcess(work / "queue", env)
    try:
        await daemon.wait_for("service.ready", 1, 120)
        await asyncio.sleep(WARM_S)
        before = daemon.cpu_s()
        await asyncio.sleep(seconds)
        return 100 * (daemon.cpu_s() - before) / seconds
    finally:
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)


async def main(seconds: float) -> None:
    trees = [("this tree", str(ROOT / "daemon"))]
    if baseline := os.environ.get("BENCH_BASELINE"):
        trees.append(("baseline", baseline))
    with LocalServer() as server:
        env = {k: v for k, v in server.env().items() if not k.startswith("FLOWSUBMIT_")}
        figures = [await idle_pct(path, env, seconds) for _, path in trees]
    print(f"idle daemon, nothing pending, {seconds:g} s after {WARM_S:g} s (machine shared):")
    print("| figure | " + " | ".join(name for name, _ in trees) + " |")
    print("|---|" + "---|" * len(trees))
    print("| CPU, % of a core | " + " | ".join(f"{pct:.2f}" for pct in figures) + " |")


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]) if len(sys.argv) > 1 else 120.0))
