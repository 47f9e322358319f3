"""The command line without a daemon: validate, enqueue, status, cancel, schema (no server)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowsubmit.cli import main
from flowsubmit.jobs.model import job_schema
from flowsubmit.queue.folders import Queue

JOB = {
    "deployment": "etl/etl-deployment",
    "runs": [{"parameters": {"table": 1}}],
    "matrix": {"table": [2, 3]},
}


def test_validate_accepts_a_good_job(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid job exits 0 and says how many runs it makes."""
    path = tmp_path / "job.json"
    path.write_text(json.dumps(JOB))
    assert main(["validate", str(path)]) == 0
    assert capsys.readouterr().out == f"ok: {path}: 3 runs\n"


def test_validate_names_the_file_field_and_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An invalid job exits 2 with one line naming the file, the field and what is wrong."""
    path = tmp_path / "job.json"
    path.write_text(json.dumps({**JOB, "max_concurency": 3}))
    assert main(["validate", str(path)]) == 2
    assert (
        capsys.readouterr().err
        == f"flowsubmit: {path}: field 'max_concurency': unknown key (did you mean 'max_concurrency'?)\n"
    )


def test_enqueue_drops_atomically_and_prints_the_id_the_daemon_will_use(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """enqueue writes the job into incoming/ (via tmp/), with the printed id inside it."""
    path = tmp_path / "job.json"
    path.write_text(json.dumps(JOB))
    queue = tmp_path / "queue"
    assert main(["enqueue", "--create", "--queue", str(queue), str(path)]) == 0
    job_id = capsys.readouterr().out.strip()
    assert job_id.startswith("job-")
    (dropped,) = (queue / "incoming").iterdir()
    assert dropped.name == f"{job_id}.json"
    assert json.loads(dropped.read_text()) == {"id": job_id, **JOB}
    assert list((queue / "tmp").iterdir()) == []


def test_enqueue_keeps_an_explicit_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A job with `id` is dropped as is, under that id."""
    path = tmp_path / "job.json"
    path.write_bytes(json.dumps({"id": "nightly-1", **JOB}).encode())
    assert main(["enqueue", "--create", "--queue", str(tmp_path / "q"), str(path)]) == 0
    assert capsys.readouterr().out == "nightly-1\n"
    assert (tmp_path / "q" / "incoming" / "nightly-1.json").read_bytes() == path.read_bytes()


def test_status_counts_jobs_per_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """status counts job files only, shows a processing/ job's progress, and no live lock as waiting for recovery.

    The runs not final are split by the journal's latest ``states`` record, late first:
    a run that ended since it was written leaves its count (here: the running one).
    """
    queue = tmp_path / "q"
    for folder in ("tmp", "incoming", "processing", "done", "failed", "rejected"):
        (queue / folder).mkdir(parents=True)
    (queue / "incoming" / "a.json").write_text(json.dumps(JOB))
    (queue / "done" / "b.json").write_text(json.dumps(JOB))
    (queue / "done" / "b.result.json").write_text("{}")
    (queue / "processing" / "c.json").write_text(json.dumps(JOB))
    (queue / "processing" / "c.journal").write_text(
        '{"rec":"created","stage":0,"index":0,"attempt":0,"flow_run_id":"r"}\n'
        '{"rec":"created","stage":0,"index":1,"attempt":0,"flow_run_id":"s"}\n'
        '{"rec":"states","scheduled":0,"late":1,"running":1}\n'
        '{"rec":"final","flow_run_id":"s","state_type":"COMPLETED","state_name":"Completed"}\n'
    )
    assert main(["status", "--queue", str(queue)]) == 0
    lines = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    assert lines[:5] == [
        f"{queue}  incoming: 1  processing: 1  done: 1  failed: 0  rejected: 0",
        "no daemon on this host (no heartbeat file)",
        "job  runs  created  scheduled  late  running  succeeded  failed  cancelled  age  owner",
        "c       3        2          0     1        0          1       0          0    ?  waiting for recovery",
        "queued (1): a",
    ]
    assert [line.split() for line in lines[5:]] == [
        ["recently", "finished"],
        ["job", "status", "summary", "ended", "result"],
        ["b", "?", "0s", "ago", f"{queue}/done/b.result.json"],  # a result without a status
    ]


def test_cancel_writes_a_request_for_a_running_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """cancel leaves processing/JOB.cancel for the daemon; an unknown job is bad input."""
    queue = tmp_path / "q"
    Queue(queue).ensure()
    (queue / "processing" / "j1.json").write_text("{}")
    assert main(["cancel", "--queue", str(queue), "j1"]) == 0
    assert (queue / "processing" / "j1.cancel").exists()
    assert main(["cancel", "--queue", str(queue), "nope"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "flowsubmit: cancel nope: no such job in incoming/, processing/, done/, failed/ or rejected/"
    )


def test_cancel_of_a_waiting_job_ends_it_cancelled_without_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job still in incoming/ goes to failed/ with a `cancelled` result and no run; --wait prints the summary."""
    monkeypatch.setenv("FLOWSUBMIT_QUEUE", str(tmp_path / "q"))
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"id": "later", **JOB}))
    assert main(["enqueue", "--create", str(path)]) == 0
    assert main(["cancel", "--wait", "later"]) == 0
    assert capsys.readouterr().out.splitlines()[1:] == [
        "cancelled later before it started: no run was created (failed/later.result.json)",
        "Summary → 0/0 succeeded, 0 failed",
    ]
    queue = Queue(tmp_path / "q")
    folder, result = queue.outcome("later") or ("", {})
    assert (folder, result["status"], result["runs"]) == ("failed", "cancelled", [])
    assert sorted(p.name for p in queue.failed.iterdir()) == [
        "later.journal",
        "later.json",
        "later.result.json",
    ]
    assert list(queue.incoming.iterdir()) == list(queue.processing.iterdir()) == []
    assert main(["cancel", "later"]) == 0  # again: it says so, and changes nothing
    assert capsys.readouterr().out == "later is already cancelled (failed/later.result.json)\n"


def test_schema_prints_the_job_schema(capsys: pytest.CaptureFixture[str]) -> None:
    """schema prints exactly the generated JSON Schema."""
    assert main(["schema"]) == 0
    assert json.loads(capsys.readouterr().out) == job_schema()


def test_validate_lists_every_problem_of_every_file_in_file_order(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several files and a glob: each problem on its own line, in file order, stage matrix errors prefixed."""
    monkeypatch.chdir(tmp_path)
    Path("a.json").write_text(
        '{"retries": 50, "deployment": "a/b", "stages": [{"runs": [{}]}, {"matrix": {"x": []}}],'
        ' "max_concurency": 3}'
    )
    Path("b.json").write_text(json.dumps(JOB))
    assert main(["validate", "*.json", "missing.json"]) == 2
    out, err = capsys.readouterr()
    assert out == "ok: b.json: 3 runs\n"
    assert err.splitlines() == [
        "flowsubmit: a.json: field 'retries': must be at most 10, not 50",
        "flowsubmit: a.json: field 'stages.1.matrix.x': is an empty list, so the matrix would have no runs",
        "flowsubmit: a.json: field 'max_concurency': unknown key (did you mean 'max_concurrency'?)",
        "flowsubmit: missing.json: no such file",
    ]
    assert main(["validate", "--json", "b.json", "a.json"]) == 2
    report = json.loads(capsys.readouterr().out)
    assert [(f["file"], f["ok"], f["runs"], len(f["problems"])) for f in report["files"]] == [
        ("b.json", True, 3, 0),
        ("a.json", False, None, 3),
    ]
    assert report["ok"] is False
    assert report["files"][1]["problems"][1]["field"] == "stages.1.matrix.x"


def test_enqueue_refuses_a_missing_queue_and_an_id_that_already_ran(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --create a missing queue is refused; an id already in done/ is refused naming where."""
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"id": "nightly-1", **JOB}))
    queue = tmp_path / "q"
    assert main(["enqueue", "--queue", str(queue), str(path)]) == 2
    assert capsys.readouterr().err.splitlines()[0] == f"flowsubmit: queue {queue}: does not exist"
    assert not queue.exists()
    Queue(queue).ensure()
    (queue / "done" / "nightly-1.json").write_text("{}")
    assert main(["enqueue", "--queue", str(queue), str(path)]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"flowsubmit: {path}: field 'id': duplicate job id: 'nightly-1' already ran as done/nightly-1.json"
    )
    assert list((queue / "incoming").iterdir()) == []


def test_docs_cli_lists_every_subcommand_and_option() -> None:
    """docs/cli.md has a section per subcommand naming each of its options (settings flags are documented once, as settings)."""
    import argparse

    from flowsubmit.cli.parser import build_parser as _parser
    from flowsubmit.settings import Settings
    from tests.support import ROOT

    text = (ROOT / "docs" / "cli.md").read_text()
    sections = dict((part.split("`", 1)[0], part) for part in text.split("### `flowsubmit ")[1:])
    (commands,) = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{name} {option}"
        for name, parser in commands.choices.items()
        for action in parser._actions
        for option in action.option_strings
        if option.startswith("--")
        and option not in ("--help", "--debug")
        and (action.dest == "queue" or action.dest not in Settings.model_fields)
        and option not in sections.get(name, "")
    ]
    assert missing == []
    assert sorted(sections) == sorted(commands.choices)


def test_errors_that_are_not_flowsubmit_s_own_are_one_line_too() -> None:
    """An OS error names its file, a timeout says so, and a bug is an internal error with a hint, never a traceback."""
    from flowsubmit.cli.errors import describe

    assert describe(PermissionError(13, "Permission denied", "/q/tmp")).lines() == [
        "flowsubmit: /q/tmp: permission denied"
    ]
    assert describe(TimeoutError("prefect server not healthy after 90.0s")).lines() == [
        "flowsubmit: timed out: prefect server not healthy after 90.0s"
    ]
    bug = describe(KeyError("x"))
    assert (bug.code, bug.lines()) == (
        1,
        [
            "flowsubmit: internal error: KeyError: 'x'",
            "  hint: run it again with --debug for the traceback, and please report it",
        ],
    )
