"""Scale: one big matrix job on one daemon, measured beside the raw bulk route in the same run.

Run: ``.venv/bin/python bench/scale.py [runs] [--topology] [--submit-only | --engine]``
(``make bench-scale`` runs 10,000 on both). Prints a table; asserts nothing.
``--submit-only`` runs the daemon's submission alone (no raw phase, no idle, no
driver) and prints its rate: the quick loop for work on the submission path.
``--engine`` runs no server: ``bench/engine_cost.py`` prints flowsubmit's own CPU per
run by phase and bytes per pending run (tracemalloc), beside the tree at
``BENCH_BASELINE`` (another checkout's ``daemon`` directory) measured in the same run.

``BENCH_NO_LATE=1`` turns the servers' late-runs service off: no run gets a Late
event, as when workers start runs within 15 s of their creation.
``BENCH_RAW_SUBSCRIBED=1`` measures the raw loop again while it holds the daemon's
subscription, then follows its runs to their finals: its CPU per run is the floor
under the daemon's (``raw_phase``).
``BENCH_DAEMON_ENV="FLOWSUBMIT_MAX_INFLIGHT_SUBMISSIONS=1 ..."`` gives the daemon
settings to try (the bench otherwise clears every ``FLOWSUBMIT_`` variable).

By default the script starts its own embedded SQLite-backed server; with
``--topology`` it starts the production topology (``flowsubmit.local.topology``:
PostgreSQL, Redis, two API replicas, an auth string): the daemon talks to replica A,
the driver to replica B, so every final event reaches the daemon through Redis.

Every request of the raw baseline and of the daemon goes through a counting
loopback proxy (``tests/support/proxy.py``), so both pay the same hop. Each of the two
phases gets a server (or topology) of its own, started fresh the same way: on one
server the daemon would meet the baseline's runs turning Late (Prefect's late-runs
service rewrites every Scheduled run nobody picked up 15 s after its start time,
and on SQLite those writes contend with the creates), which slowed the daemon's
phase by up to half. In order:

1. raw bulk: ``runs`` runs created by sequential ``POST
   /deployments/{id}/create_flow_run/bulk`` calls of 100, items refused by the
   server ("database is locked") put back into the next call;
2. on the second server, the daemon (``flowsubmit run``, a subprocess) gets one
   matrix job of ``runs`` runs of a never-served deployment; submission rate =
   runs / (last ``run.submitted`` - ``job.claimed``);
3. idle: the daemon's CPU over one reconciliation interval with every run pending,
   from ``LATE_WAVE_S`` after the last create (the runs created last turn Late in
   between: a state change each, printed apart);
4. a separate driver process moves every run straight to its final state through
   the API (every 10th Failed); detection latency of a run = its ``run.finished``
   log time - its ``end_time`` on the server (one host, one clock);
5. the runs carrying the job's tag are counted on the server (lost, duplicated).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the test proxy and driver are shared with the tests

from flowsubmit.local.localserver import LocalServer  # noqa: E402

FLOW = "bench-scale"
BULK = 100
RECONCILE_INTERVAL_S = float(os.environ.get("BENCH_IDLE_S", 60.0))
DRIVER_CONCURRENCY = 4
#: After the last create, before the idle phase: Prefect's late-runs service marks a
#: Scheduled run Late 15 s after its start time, checking every 5 s.
LATE_WAVE_S = 25.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the daemon process ---------------------------------------------------------------------------


class DaemonProcess:
    """A ``flowsubmit run`` subprocess with its JSON log, CPU and memory read from ``/proc``."""

    def __init__(self, queue: Path, env: dict[str, str]) -> None:
        self.queue = queue
        self.log_path = queue.parent / "daemon.log"
        self._offset = 0
        self.lines: list[dict[str, Any]] = []
        wrap = os.environ.get("FLOWSUBMIT_BENCH_WRAP", "").split()  # e.g. a profiler
        with open(self.log_path, "wb") as out:
            self.process = subprocess.Popen(
                [*wrap, sys.executable, "-m", "flowsubmit.cli", "run", "--queue", str(queue)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )
        self.pid = self.process.pid

    def read(self) -> list[dict[str, Any]]:
        """New log lines since the last call (also appended to ``lines``)."""
        with open(self.log_path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self._offset += end
        new = []
        for raw in data[:end].splitlines():
            try:
                new.append(json.loads(raw))
            except ValueError:
                continue  # a profiler's own output
        self.lines.extend(new)
        return new

    def events(self, name: str) -> list[dict[str, Any]]:
        return [line for line in self.lines if line.get("event") == name]

    async def wait_for(
        self, name: str, count: int, timeout_s: float, unless: str | None = None
    ) -> None:
        """Until ``count`` lines ``name`` were logged; fails at once on a line ``unless``."""
        deadline = time.monotonic() + timeout_s
        seen = len(self.events(name))
        while seen < count:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited:\n{self.log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{seen}/{count} {name} after {timeout_s} s")
            await asyncio.sleep(0.5)
            for line in self.read():
                seen += line.get("event") == name
                if unless is not None and line.get("event") == unless:
                    raise RuntimeError(f"the daemon logged {unless}: {line}")

    def cpu_s(self) -> float:
        return sum(self.cpu_times())

    def cpu_times(self) -> tuple[float, float]:
        """(user, system) CPU seconds of every thread of the daemon so far."""
        fields = Path(f"/proc/{self._target()}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[11]) / CLOCK_TICKS, int(fields[12]) / CLOCK_TICKS  # utime, stime

    def peak_rss_mb(self) -> float:
        return self._status_mb("VmHWM:")

    def rss_mb(self) -> float:
        return self._status_mb("VmRSS:")

    def _status_mb(self, field: str) -> float:
        for line in Path(f"/proc/{self._target()}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) / 1024
        return math.nan

    def _target(self) -> int:
        """The daemon's pid (the profiler's child when wrapped)."""
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        if os.environ.get("FLOWSUBMIT_BENCH_WRAP") and children.exists():
            kids = children.read_text().split()
            if kids:
                return int(kids[0])
        return self.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _enqueue(queue: Path, job: str, env: dict[str, str]) -> str:
    """``flowsubmit enqueue`` (a subprocess, as producers do); the job's id."""
    done = subprocess.run(
        [sys.executable, "-m", "flowsubmit.cli", "enqueue", "--queue", str(queue), "-"],
        input=job.encode(),
        capture_output=True,
        cwd=ROOT,
        env=env,
    )
    if done.returncode != 0:
        raise RuntimeError(f"enqueue refused the job: {done.stderr.decode().strip()}")
    return done.stdout.decode().strip()


def _start_driver(tag: str, runs: int, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """The driver process, talking to the server directly (not through the proxy)."""
    return subprocess.Popen([sys.executable, __file__, "--drive", tag, str(runs)], env=env)


def _ts(line: dict[str, Any]) -> float:
    return datetime.fromisoformat(line["timestamp"]).timestamp()


# -- measurements -----------------------------------------------------------------------------------


async def _deployment() -> str:
    from prefect import flow

    @flow(name=FLOW)
    def bench_scale(i: int = 0) -> int:
        return i

    spec = await bench_scale.ato_deployment(name="d")
    await spec.aapply()
    return f"{FLOW}/d"


async def _raw_bulk(deployment_id: str, runs: int, tags: list[str]) -> tuple[float, int]:
    """(runs/s, items refused and sent again) of sequential bulk calls of 100."""
    from prefect.client.orchestration import get_client

    key = uuid.uuid4().hex[:8]
    todo = [
        {"parameters": {"i": i}, "idempotency_key": f"raw/{key}/{i}", "tags": [*tags, f"raw-{key}"]}
        for i in range(runs)
    ]
    refused = 0
    start = time.perf_counter()
    async with get_client() as client:
        while todo:
            batch, todo = todo[:BULK], todo[BULK:]
            response = await client.request(
                "POST",
                "/deployments/{id}/create_flow_run/bulk",  # type: ignore[arg-type]
                path_params={"id": deployment_id},
                json=batch,
            )
            results = response.json()["results"]
            again = [b for b, r in zip(batch, results, strict=True) if r["status"] != "CREATED"]
            refused += len(again)
            todo = again + todo
    return runs / (time.perf_counter() - start), refused


async def _runs_of(tag: str) -> list[Any]:
    from tests.support.crashkit import runs_tagged

    return await runs_tagged(tag)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]  # nearest rank


def _upstream_port() -> int:
    return int(os.environ["PREFECT_API_URL"].rsplit(":", 1)[1].split("/", 1)[0])


async def raw_phase(
    runs: int, subscribed: bool = False, driver_env: dict[str, str] | None = None
) -> dict[str, Any]:
    """The raw bulk route's rate through the proxy (``rate``, ``refused``).

    ``subscribed`` (``--raw --subscribed``; ``BENCH_RAW_SUBSCRIBED=1`` measures it after
    the plain loop, on a server of its own, and prints it beside): while the loop
    creates, the same process holds the daemon's event subscription
    (``Gateway.run_events``, the daemon's filter) for the tag the runs carry and reads
    it, so the server streams their events as it does to a daemon: the cost of being
    tracked, without the rest of the daemon. Then the driver (``driver_env``) ends
    every run and the loop reads the stream until it has seen each run's final state:
    this process's CPU per run while it creates (``create_ms``) and while it follows
    the runs to their ends (``track_ms``) is what Prefect's client alone costs for the
    daemon's work, the floor under the daemon's CPU per run.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from tests.support.proxy import Proxy

    from flowsubmit._types import FINAL_STATE_TYPES
    from flowsubmit.gateway.client import Gateway

    name = await _deployment()
    async with Gateway() as gateway:
        deployment = await gateway.resolve_deployment(name)
    figures: dict[str, Any] = {}
    async with Proxy(_upstream_port()) as proxy:
        # Prefect read PREFECT_API_URL from the environment at import: the setting itself
        # must change, or the calls would bypass the proxy the daemon pays for.
        with temporary_settings({PREFECT_API_URL: proxy.api_url}):
            if not subscribed:
                figures["rate"], figures["refused"] = await _raw_bulk(deployment.id, runs, [])
            else:
                tag = f"raw-subscribed-{uuid.uuid4().hex[:8]}"
                ended: set[str] = set()
                all_ended = asyncio.Event()
                async with Gateway() as gateway, gateway.run_events(tag) as events:

                    async def read() -> None:
                        async for snapshot in events:
                            if snapshot.state_type in FINAL_STATE_TYPES:
                                ended.add(snapshot.flow_run_id)
                                if len(ended) == runs:
                                    all_ended.set()

                    reader = asyncio.create_task(read())
                    await asyncio.sleep(1.0)  # past the subscription's live margin
                    cpu = time.process_time()
                    figures["rate"], figures["refused"] = await _raw_bulk(
                        deployment.id, runs, [tag]
                    )
                    figures["create_ms"] = 1000 * (time.process_time() - cpu) / runs
                    if driver_env is not None:
                        # The last runs' Late events come now, outside both windows, as the daemon's.
                        await asyncio.sleep(LATE_WAVE_S)
                        cpu, system = time.process_time(), os.times().system
                        driver = await asyncio.to_thread(_start_driver, tag, runs, driver_env)
                        await asyncio.to_thread(driver.wait)
                        # No reconciliation here: a final the server dropped is never seen.
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(all_ended.wait(), 120)
                        figures["track_ms"] = 1000 * (time.process_time() - cpu) / runs
                        figures["track_system_ms"] = 1000 * (os.times().system - system) / runs
                        figures["finals_seen"] = len(ended)
                    reader.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await reader
        if not any(seen.path.endswith("/create_flow_run/bulk") for seen in proxy.seen):
            raise RuntimeError("the raw phase's creates did not go through the proxy")
        return figures


async def daemon_phase(row: dict[str, Any], driver_env: dict[str, str]) -> None:
    """The daemon's figures, added to ``row``; then the table is printed."""
    from tests.support.proxy import Proxy

    from flowsubmit.engine.runset import job_tag

    runs = row["runs"]
    name = await _deployment()
    async with Proxy(_upstream_port()) as proxy:
        work = Path(tempfile.mkdtemp(prefix="flowsubmit-scale-"))
        env = {**os.environ, "PREFECT_API_URL": proxy.api_url}
        env = {k: v for k, v in env.items() if not k.startswith("FLOWSUBMIT_")}
        # The default policy refuses a job of more than 10,000 runs, or of more than 1 MiB.
        env["FLOWSUBMIT_MAX_RUNS_PER_JOB"] = str(max(runs, 10_000))
        env["FLOWSUBMIT_MAX_JOB_BYTES"] = str(max(64 * runs, 1024 * 1024))
        # BENCH_DAEMON_ENV="FLOWSUBMIT_A=1 FLOWSUBMIT_B=2": daemon settings to try.
        for item in os.environ.get("BENCH_DAEMON_ENV", "").split():
            setting, _, value = item.partition("=")
            env[setting] = value
        daemon = DaemonProcess(work / "queue", env)
        try:
            await daemon.wait_for("service.ready", 1, 120)
            cpu_ready, row["ready_rss_mb"] = daemon.cpu_s(), daemon.rss_mb()
            system_ready = daemon.cpu_times()[1]
            job = json.dumps({"deployment": name, "matrix": {"i": list(range(runs))}})
            job_id = await asyncio.to_thread(_enqueue, daemon.queue, job, env)
            await daemon.wait_for("run.submitted", runs, 3600, unless="job.rejected")
            claimed = _ts(daemon.events("job.claimed")[0])
            submitted = [_ts(line) for line in daemon.events("run.submitted")]
            row["daemon"] = runs / (max(submitted) - claimed)
            row["first_submit_s"] = min(submitted) - claimed
            seen_submitting = proxy.seen[:]
            cpu_submitted, system_submitted = daemon.cpu_s(), daemon.cpu_times()[1]
            row["cpu_submit_ms"] = 1000 * (cpu_submitted - cpu_ready) / runs
            row["system_submit_ms"] = 1000 * (system_submitted - system_ready) / runs
            if row.get("submit_only"):
                print(
                    f"daemon: {row['daemon']:.1f} runs/s, first run created "
                    f"{row['first_submit_s']:.1f} s after the claim, "
                    f"{len(daemon.events('gateway.retrying'))} gateway.retrying"
                )
                return

            # The runs created in the last seconds of submission turn Late now (nobody
            # serves the bench's deployment): a state change per run, not idle work.
            await asyncio.sleep(LATE_WAVE_S)
            cpu_before, seen_late = daemon.cpu_s(), len(proxy.seen)
            row["late_wave_cpu_s"] = cpu_before - cpu_submitted
            await asyncio.sleep(RECONCILE_INTERVAL_S + 5)
            cpu_idle_end, system_idle_end = daemon.cpu_s(), daemon.cpu_times()[1]
            row["idle_cpu_pct"] = 100 * (cpu_idle_end - cpu_before) / (RECONCILE_INTERVAL_S + 5)
            row["pending_rss_mb"] = daemon.rss_mb()
            seen_idle = len(proxy.seen)

            tag = job_tag(job_id)
            driver = await asyncio.to_thread(_start_driver, tag, runs, driver_env)
            try:
                await daemon.wait_for("run.finished", runs, 3600)
            finally:
                await asyncio.to_thread(driver.wait)
            await daemon.wait_for("job.finished", 1, 600)
            row["cpu_s"] = daemon.cpu_s()
            row["cpu_track_ms"] = 1000 * (row["cpu_s"] - cpu_idle_end) / runs
            row["system_track_ms"] = 1000 * (daemon.cpu_times()[1] - system_idle_end) / runs
            row["cpu_start_s"] = cpu_ready
            row["rss_mb"] = daemon.peak_rss_mb()
        finally:
            daemon.stop()
        tracking = [
            s for s in proxy.seen[len(seen_submitting) :] if "create_flow_run" not in s.path
        ]
        row["idle_requests"] = seen_idle - seen_late
        idle = proxy.seen[seen_late:seen_idle]
        row["idle_routes"] = dict(Counter(f"{s.method} {s.path}" for s in idle))
        row["requests_per_run"] = len(tracking) / runs
        row["tracking_routes"] = dict(Counter(f"{s.method} {s.path}" for s in tracking))

    server_runs = await _runs_of(tag)
    ends = {str(r.id): r.end_time.timestamp() for r in server_runs if r.end_time}
    finished = daemon.events("run.finished")
    latencies = [_ts(f) - ends[f["flow_run_id"]] for f in finished if f["flow_run_id"] in ends]
    keys = Counter(r.idempotency_key for r in server_runs)
    row["lost"] = runs - len(keys)
    row["duplicated"] = len(server_runs) - len(keys)  # more than one run for one key
    row["p50"], row["p95"], row["max"] = (
        statistics.median(latencies),
        _pct(latencies, 0.95),
        max(latencies),
    )
    row["sources"] = dict(Counter(f["source"] for f in finished))
    row["finished_twice"] = len(finished) - len({f["flow_run_id"] for f in finished})
    result = json.loads(next(daemon.queue.glob("*/*.result.json")).read_text())
    row["summary"] = result["summary"]["total"], result["summary"]["succeeded"]
    if os.environ.get("BENCH_KEEP"):
        seen = [[x.at, x.method, x.path, x.status] for x in proxy.seen]
        (work / "requests.json").write_text(json.dumps(seen))
        print(f"- kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    _print(row)


def _print(row: dict[str, Any]) -> None:
    print(
        "| server | runs | raw bulk runs/s | daemon runs/s | ratio | detection p50 / p95 / max s "
        "| tracking requests/run | peak RSS MB | CPU s | idle CPU % | lost | duplicated |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(
        f"| {row['server']} | {row['runs']} | {row['raw']:.1f} | {row['daemon']:.1f} "
        f"| {row['daemon'] / row['raw']:.2f} | {row['p50']:.2f} / {row['p95']:.2f} / {row['max']:.2f} "
        f"| {row['requests_per_run']:.3f} | {row['rss_mb']:.0f} | {row['cpu_s']:.1f} "
        f"| {row['idle_cpu_pct']:.1f} | {row['lost']} | {row['duplicated']} |"
    )
    print()
    print(
        f"- raw bulk: measured on {row['raw_runs']} runs; "
        f"{row['raw_refused']} items refused and sent again"
    )
    if "raw_subscribed" in row:
        print(
            f"- raw bulk holding the daemon's event subscription: {row['raw_subscribed']:.1f} "
            f"runs/s ({row['raw_subscribed_refused']} items refused); daemon / that: "
            f"{row['daemon'] / row['raw_subscribed']:.2f}"
        )
    per_run = row["cpu_submit_ms"] + row["cpu_track_ms"]
    print(
        f"- daemon CPU per run: {per_run:.2f} ms = submit {row['cpu_submit_ms']:.2f} ms "
        f"(service.ready to the last run.submitted) + track {row['cpu_track_ms']:.2f} ms "
        f"(end of idle to job.finished); start-up {row['cpu_start_s']:.1f} s and idle not included; "
        f"of which in the kernel (system time): submit {row['system_submit_ms']:.2f} ms, "
        f"track {row['system_track_ms']:.2f} ms"
    )
    if "raw_track_ms" in row:
        floor = row["raw_create_ms"] + row["raw_track_ms"]
        print(
            f"- Prefect's client alone (the raw loop holding the subscription, then reading "
            f"every run's final): {floor:.2f} ms = create {row['raw_create_ms']:.2f} ms + track "
            f"{row['raw_track_ms']:.2f} ms; the daemon above it: {per_run - floor:.2f} ms "
            f"(submit {row['cpu_submit_ms'] - row['raw_create_ms']:+.2f}, track "
            f"{row['cpu_track_ms'] - row['raw_track_ms']:+.2f}); it saw "
            f"{row['raw_finals_seen']} of {row['raw_runs']} finals on the stream; its track "
            f"in the kernel: {row['raw_track_system_ms']:.2f} ms"
        )
    print(
        f"- daemon RSS: {row['ready_rss_mb']:.0f} MB ready, {row['pending_rss_mb']:.0f} MB with "
        f"every run pending, {row['rss_mb']:.0f} MB peak"
    )
    print(f"- daemon: first run submitted {row['first_submit_s']:.1f} s after the claim")
    print(
        f"- idle ({RECONCILE_INTERVAL_S + 5:g} s, all pending, from {LATE_WAVE_S:g} s after the "
        f"last create): {row['idle_requests']} requests {row['idle_routes']}; the "
        f"{LATE_WAVE_S:g} s before it, while the last runs created turned Late, used "
        f"{row['late_wave_cpu_s']:.2f} CPU s"
    )
    print(f"- finals recorded from {row['sources']}; recorded twice: {row['finished_twice']}")
    print(f"- job result: {row['summary'][0]} runs, {row['summary'][1]} succeeded")
    print(f"- tracking requests: {row['tracking_routes']}")


# -- the driver (a separate process, like the runners of real runs) -----------------------------------


async def _drive(tag: str, runs: int) -> None:
    from tests.support.driver import drive

    ids = sorted(str(r.id) for r in await _runs_of(tag))
    failed = ids[9::10]
    completed = [i for i in ids if i not in set(failed)]
    half = DRIVER_CONCURRENCY // 2
    await asyncio.gather(
        drive(completed, "Completed", half, direct=True),
        drive(failed, "Failed", half, direct=True),
    )


@contextlib.contextmanager
def _server(topology: bool) -> Iterator[dict[str, str]]:
    """A fresh server (or topology) for one phase: sets its client environment, yields the driver's."""
    from flowsubmit.local.topology import Topology

    before = dict(os.environ)
    # BENCH_NO_LATE=1: no run turns Late (the server's late-runs service off), as when
    # workers start runs within 15 s; otherwise every run of the never-served
    # deployment gets a Late event, a state change the daemon parses and follows.
    no_late = os.environ.get("BENCH_NO_LATE") == "1"
    settings = {"PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED": "false"} if no_late else {}
    started: Topology | LocalServer = (
        Topology(server_settings=settings) if topology else LocalServer(server_env=settings)
    )
    try:
        started.start(timeout_s=600)  # a busy shared machine starts it slowly
        os.environ.update(started.env())
        # On the topology the driver talks to replica B, so every final event reaches
        # the daemon (on A) through Redis.
        driver = started.b.env() if isinstance(started, Topology) else {}
        yield {**os.environ, **driver}
    finally:
        started.close()
        os.environ.clear()
        os.environ.update(before)


def main(runs: int, topology: bool, submit_only: bool = False) -> None:
    label = "production topology (A: daemon, B: driver)" if topology else "embedded SQLite"
    row: dict[str, Any] = {"server": label, "runs": runs, "submit_only": submit_only}
    if submit_only:
        with _server(topology) as driver_env:
            asyncio.run(daemon_phase(row, driver_env))
        return
    # The raw phase in a process of its own: Prefect reads its settings (the API URL)
    # once, when it is first imported, and each phase has a server of its own.
    flags = ["--topology"] if topology else []
    # BENCH_RAW_RUNS: the raw baseline's rate measured on fewer runs (it is a rate; at
    # 100,000 runs the raw loop alone takes 20 minutes). The table says when it is.
    row["raw_runs"] = int(os.environ.get("BENCH_RAW_RUNS", runs))
    raw = subprocess.run(
        [sys.executable, __file__, "--raw", str(row["raw_runs"]), *flags],
        stdout=subprocess.PIPE,
        check=True,
        cwd=ROOT,
    )
    plain = json.loads(raw.stdout.decode().strip().splitlines()[-1])
    row["raw"], row["raw_refused"] = plain["rate"], plain["refused"]
    if os.environ.get("BENCH_RAW_SUBSCRIBED") == "1":  # and the same loop, tracked as a daemon is
        raw = subprocess.run(
            [sys.executable, __file__, "--raw", "--subscribed", str(row["raw_runs"]), *flags],
            stdout=subprocess.PIPE,
            check=True,
            cwd=ROOT,
        )
        tracked = json.loads(raw.stdout.decode().strip().splitlines()[-1])
        row["raw_subscribed"], row["raw_subscribed_refused"] = tracked["rate"], tracked["refused"]
        row["raw_create_ms"], row["raw_track_ms"] = tracked["create_ms"], tracked["track_ms"]
        row["raw_finals_seen"] = tracked["finals_seen"]
        row["raw_track_system_ms"] = tracked["track_system_ms"]
    with _server(topology) as driver_env:
        asyncio.run(daemon_phase(row, driver_env))


def engine(runs: int) -> None:
    """The engine's own cost per run (``bench/engine_cost.py``), beside ``BENCH_BASELINE``'s tree."""
    from bench.engine_cost import report

    def figures(daemon_dir: str) -> Any:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([daemon_dir, str(ROOT)])}
        done = subprocess.run(
            [sys.executable, str(ROOT / "bench" / "engine_cost.py"), str(runs), "--json"],
            env=env,
            stdout=subprocess.PIPE,
            check=True,
            cwd=ROOT,
        )
        return json.loads(done.stdout.decode().strip().splitlines()[-1])

    baseline = os.environ.get("BENCH_BASELINE")
    mine = figures(str(ROOT / "daemon"))
    report(runs, *mine, baseline=figures(baseline) if baseline else None)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if "--engine" in sys.argv:
        engine(int(args[0]) if args else 10_000)
    elif "--drive" in sys.argv:
        asyncio.run(_drive(args[0], int(args[1])))
    elif "--raw" in sys.argv:
        with _server("--topology" in sys.argv) as driver_env:
            subscribed = "--subscribed" in sys.argv
            figures = raw_phase(int(args[0]), subscribed, driver_env if subscribed else None)
            print(json.dumps(asyncio.run(figures)))
    else:
        main(
            int(args[0]) if args else 10_000, "--topology" in sys.argv, "--submit-only" in sys.argv
        )
