"""The command line end to end, as a user runs it: real processes, files and signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO, table_counts
from tests.emulators import CLICKFLOW, clickflow, free_port


def test_local_pipeline_runs_to_completion(tmp_path: Path) -> None:
    db = tmp_path / "local.duckdb"
    env = {"CLICKFLOW_VISITS": "2000", "CLICKFLOW_DUCKDB": str(db), "PORT": str(free_port())}
    result = clickflow("run", "config/local.yaml", env=env)
    assert result.returncode == 0, result.stderr
    assert "messages" in result.stdout and "events/s" in result.stdout
    counts = table_counts(db)
    whole = sum(int(line.split()[1].replace(",", "")) for line in result.stdout.splitlines()
                if line.strip().startswith(("invalid_json", "invalid_session_id")))  # fmt: skip
    assert counts["visits"] + whole == 2000


def test_batch_pipeline_reads_the_sample(tmp_path: Path) -> None:
    db = tmp_path / "batch.duckdb"
    result = clickflow("run", "config/files.yaml", env={"CLICKFLOW_DUCKDB": str(db)})
    assert result.returncode == 0, result.stderr
    assert table_counts(db) == {"visits": 1, "events": 10, "purchase_items": 3, "dead_letter": 0}


def test_validate_exits_0_for_valid_and_2_for_invalid(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources:\n  - type: nope\nsinks:\n  - type: duckdb\n    pth: x\n")
    ok = clickflow("validate", "config/local.yaml", "config/files.yaml")
    assert ok.returncode == 0 and ok.stdout.count(": ok") == 2
    failed = clickflow("validate", str(bad))
    assert failed.returncode == 2
    assert failed.stderr.splitlines() == [
        f"{bad}:2: sources[0].type: unknown source type 'nope'; "
        "known source types: file, pubsub_pull, pubsub_push, simulator",
        f"{bad}:5: sinks[0].pth: unknown option",
    ]


def test_run_refuses_an_invalid_pipeline_before_starting(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sources: [{type: simulator, count: 1}]\nsinks: [{type: duckdb, path: '${NOPE}'}]\n")
    result = clickflow("run", str(bad))
    assert result.returncode == 2
    assert "environment variable NOPE is not set" in result.stderr


def test_a_sink_that_cannot_start_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "p.yaml"
    bad.write_text(
        f"sources: [{{type: simulator, count: 1}}]\nsinks: [{{type: duckdb, path: '{tmp_path}/no/dir.db'}}]\n"
    )
    result = clickflow("run", str(bad))
    assert result.returncode == 1
    assert result.stderr.startswith("clickflow: sink 'duckdb' could not start")
    assert "Traceback" not in result.stderr


def test_plugins_lists_builtins_with_their_distribution() -> None:
    result = clickflow("plugins")
    rows = {tuple(line.split()[:4]) for line in result.stdout.splitlines()}
    expected = {
        ("source", "file", "clickflow", "local,beam"),
        ("source", "simulator", "clickflow", "local"),
        ("sink", "duckdb", "clickflow", "local,beam"),
    }
    assert expected <= rows
    assert "Generates visits; finite when count is set." in result.stdout  # its docstring, as text


def test_json_logs_carry_a_severity(tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    port = free_port()
    pipeline.write_text(
        f"sources: [{{type: simulator, count: 10}}]\nsinks: [{{type: duckdb, path: '{tmp_path}/x.db'}}]\n"
        f"monitor: {{port: {port}}}\n"
    )
    result = clickflow("run", str(pipeline), "--log-format", "json")
    entries = [json.loads(line) for line in result.stderr.splitlines()]
    assert entries and all(entry["severity"] in {"INFO", "WARNING"} for entry in entries)
    assert any(f":{port}" in entry["message"] for entry in entries)


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, ""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_drains_in_flight_work_and_exits_0(tmp_path: Path, signum: int) -> None:
    port = free_port()
    pipeline = tmp_path / "p.yaml"
    db = tmp_path / "s.duckdb"
    pipeline.write_text(
        "sources: [{type: simulator, visits_per_minute: 60000, seed: 1}]\n"
        f"sinks: [{{type: duckdb, path: '{db}', batch: {{max_age: 10s}}}}]\n"
        f"monitor: {{port: {port}}}\n"
    )
    process = subprocess.Popen([*CLICKFLOW, "run", str(pipeline)], cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if _get(f"http://127.0.0.1:{port}/readyz")[0] == 200:
                    break
            except OSError:
                pass  # not listening yet
            time.sleep(0.1)
        assert _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        status, body = _get(f"http://127.0.0.1:{port}/metrics")
        assert status == 200 and 'clickflow_messages_received_total{source="simulator"}' in body
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert "not acknowledged" not in stdout
    summary_line = next(line for line in stdout.splitlines() if line.strip().startswith("messages"))
    received = int(summary_line.split()[1].replace(",", ""))
    assert received > 0
    assert table_counts(db)["visits"] == received  # batched for 10s: only the drain wrote them


def test_a_finite_source_stopped_before_its_end_exits_3_saying_how_much_was_read(tmp_path: Path) -> None:
    pipeline, db = tmp_path / "p.yaml", tmp_path / "s.duckdb"
    pipeline.write_text(
        f"sources: [{{type: file, path: '{REPO}/data/challenge_sample.jsonl'}},"
        " {type: simulator, name: backfill, count: 100000, visits_per_minute: 6000}]\n"
        f"sinks: [{{type: duckdb, path: '{db}', batch: {{max_age: 100ms}}}}]\n"
    )
    process = subprocess.Popen([*CLICKFLOW, "run", "--no-progress", str(pipeline)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not db.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 3, stderr
    assert stdout.startswith("stopped before the end of backfill in ")
    read = int(stderr.rsplit("backfill: ", 1)[1].split(" messages")[0].replace(",", ""))
    assert 0 < read < 100000
    assert "clickflow: stopped before the end of the input (backfill: " in stderr
    assert table_counts(db)["visits"] == read + 1  # what was read was stored, the file's visit too


def test_progress_shows_on_a_terminal_and_not_in_a_pipe(tmp_path: Path) -> None:
    import pty

    data = tmp_path / "visits.jsonl"
    with data.open("wb") as out:
        subprocess.run([*CLICKFLOW, "simulate", "--count", "30000", "--seed", "1"], stdout=out, check=True)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"sources: [{{type: file, path: '{data}'}}]\nsinks: [{{type: duckdb, path: '{tmp_path}/p.db'}}]\n"
    )

    quiet = clickflow("run", str(pipeline))
    assert quiet.returncode == 0 and "\r" not in quiet.stderr

    controller, terminal = pty.openpty()
    process = subprocess.Popen([*CLICKFLOW, "run", str(pipeline)], cwd=REPO, stdin=terminal, stdout=terminal,
                               stderr=terminal)  # fmt: skip
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the terminal closed with the process
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    assert process.wait(timeout=60) == 0
    assert b"files 0/1" in shown or b"files 1/1" in shown
    assert b"events/s" in shown and b"MB" in shown
