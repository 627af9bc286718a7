"""The file source on standard input (``path: '-'``), as a user pipes into ``clickflow run``."""

from __future__ import annotations

import gzip
import os
import pty
import signal
import subprocess
import threading
import time
from pathlib import Path

import anyio
import pytest

from clickflow.options import validate_options
from clickflow_file import LINGER_S, FileSource, FileSourceOptions, expand_paths
from clickflow_file.reader import CountingReader, Stdin
from tests.conftest import table_counts
from tests.emulators import CLICKFLOW


def pipeline(tmp_path: Path) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(f"sources: [{{type: file, path: '-'}}]\nsinks: [{{type: duckdb, path: '{tmp_path}/p.duckdb'}}]\n")
    return path


def simulated(count: int) -> bytes:
    return subprocess.run([*CLICKFLOW, "simulate", "--count", str(count), "--seed", "3"], capture_output=True,
                          check=True).stdout  # fmt: skip


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_visits_piped_in_are_stored_and_the_same_input_piped_again_adds_nothing(tmp_path: Path, compress: bool) -> None:
    lines = simulated(2500) + b"{not json\n"
    piped = gzip.compress(lines) if compress else lines
    run = [*CLICKFLOW, "run", "--no-progress", str(pipeline(tmp_path))]

    first = subprocess.run(run, input=piped, capture_output=True, timeout=120)
    assert first.returncode == 0, first.stderr
    counts = table_counts(tmp_path / "p.duckdb")
    assert (counts["visits"], counts["dead_letter"]) == (2500, 1)

    again = subprocess.run(run, input=piped, capture_output=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert table_counts(tmp_path / "p.duckdb") == counts
    assert b"visits were stored already" in again.stderr
    assert b"stored already" not in first.stdout
    assert b"    stored already (duckdb)      2,500  (not stored again)\n" in again.stdout


def test_a_slow_producer_s_visits_are_stored_as_they_come_and_a_stop_ends_the_wait(tmp_path: Path) -> None:
    """Five visits, then nothing more for now: they are passed on without waiting for a batch to
    fill, and SIGTERM ends the run at once (exit 3, input unfinished) with the five stored."""
    command = [*CLICKFLOW, "run", "--no-progress", str(pipeline(tmp_path))]
    with subprocess.Popen(command, stdin=subprocess.PIPE, stderr=subprocess.PIPE) as run:
        assert run.stdin is not None and run.stderr is not None
        run.stdin.write(simulated(5))
        run.stdin.flush()
        time.sleep(2)
        run.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        try:
            assert run.wait(timeout=15) == 3
        finally:
            run.kill()
        assert time.monotonic() - stopped < 5
        assert b"file: 5 messages read" in run.stderr.read()
    assert table_counts(tmp_path / "p.duckdb")["visits"] == 5


def test_a_terminal_as_standard_input_fails_the_run_with_one_line(tmp_path: Path) -> None:
    controller, terminal = pty.openpty()
    try:
        run = subprocess.run([*CLICKFLOW, "run", "--no-progress", str(pipeline(tmp_path))], stdin=terminal,
                             capture_output=True, timeout=60)  # fmt: skip
    finally:
        os.close(terminal)
        os.close(controller)
    assert run.returncode == 1
    assert run.stderr.decode().endswith(
        "path '-' reads standard input, which is a terminal: pipe visits in, e.g. "
        "clickflow simulate --count 100 | clickflow run PIPELINE\n"
    )


def test_standard_input_named_twice_is_read_once(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_bytes(b"")
    assert anyio.run(expand_paths, ["-", str(tmp_path / "a.jsonl"), "-"]) == ["-", str(tmp_path / "a.jsonl")]


def test_lines_written_one_at_a_time_are_gathered_for_the_linger_not_a_batch_each() -> None:
    """A producer that writes a line at a time, a millisecond apart: batches are passed on as the
    input pauses, but at most one each ``LINGER_S`` (they were one a line, 1.3 cores at 5,000 a second)."""
    lines = simulated(200).splitlines(keepends=True)
    read, write = os.pipe()

    def produce() -> None:
        for line in lines:
            os.write(write, line)
            time.sleep(0.001)
        os.close(write)

    source = FileSource("file", validate_options(FileSourceOptions, {"path": "-"}))
    producer = threading.Thread(target=produce)
    started = time.monotonic()
    producer.start()
    reader = CountingReader(Stdin(read), "stdin")  # it reads the first bytes
    try:
        batches = list(source._batches(reader, "stdin"))
    finally:
        producer.join()
        reader.close()
    took = time.monotonic() - started
    assert [m.data + b"\n" for batch in batches for m in batch] == lines
    assert 2 <= len(batches) <= took / LINGER_S + 2
