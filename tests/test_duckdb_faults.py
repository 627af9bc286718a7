"""The DuckDB sink when storage misbehaves: a full disk, a second writer, times at the ends of the range."""

from __future__ import annotations

import base64
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import duckdb
import msgspec
import pytest

from clickflow.api import Message
from clickflow.options import validate_options
from clickflow.parser import VisitParser
from clickflow_duckdb import DuckDBSink, DuckDBSinkOptions, tables
from clickflow_duckdb.spool import Spool
from clickflow_simulator.generator import VisitGenerator
from tests.conftest import VALID_VISIT, table_counts
from tests.emulators import CLICKFLOW, clickflow, expected_counts
from tests.fakes import RecordingSinkContext

REQUIRED = os.environ.get("CLICKFLOW_REQUIRE_EMULATORS") == "1"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (mounting needs root, which CI has); ``remount(size)`` gives it room."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint)], capture_output=True)
    if mounted.returncode != 0:
        message = f"cannot mount a tmpfs here (root needed): {mounted.stderr.decode().strip()}"
        pytest.fail(message) if REQUIRED else pytest.skip(message)
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def _remount(mountpoint: Path, size: str) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(mountpoint)], check=True)


@pytest.mark.integration
@pytest.mark.parametrize("sink_options", ["", ", commit_every: 50ms"], ids=["per-batch", "logged"])
def test_a_full_disk_fails_the_run_with_one_line_then_a_rerun_completes_exactly(
    small_disk: Path, tmp_path: Path, sink_options: str
) -> None:
    payloads = list(VisitGenerator(seed=21, malformed_rate=0.05).messages(6000))
    source = tmp_path / "visits.jsonl"
    source.write_bytes(b"\n".join(payloads) + b"\n")
    pipeline = tmp_path / "p.yaml"
    db = small_disk / "full.duckdb"
    pipeline.write_text(
        f"sources: [{{type: file, path: '{source}'}}]\n"
        f"sinks: [{{type: duckdb, path: '{db}', batch: {{max_rows: 5000}},"
        f" retry: {{attempts: 2, initial_backoff: 10ms}}{sink_options}}}]\n"
    )
    failed = clickflow("run", "--no-progress", str(pipeline))
    assert failed.returncode == 1, failed.stderr
    assert "Traceback" not in failed.stderr
    (last,) = [line for line in failed.stderr.splitlines() if line.startswith("clickflow:")]
    assert "No space left on device" in last and str(small_disk) in last, failed.stderr

    _remount(small_disk, "256m")
    rerun = clickflow("run", "--no-progress", str(pipeline))
    assert rerun.returncode == 0, rerun.stderr
    ids = [f"{source}:{n}" for n in range(1, len(payloads) + 1)]
    assert table_counts(db) == expected_counts(payloads, ids)


@pytest.mark.anyio
@pytest.mark.parametrize("logged", [False, True], ids=["per-batch", "logged"])
async def test_after_a_fatal_error_the_database_is_opened_again_and_a_retried_write_stores_once(
    tmp_path: Path, logged: bool
) -> None:
    """A fatal DuckDB error (here a checkpoint aborted on purpose, as one out of memory or disk is)
    invalidates the database: every later write failed, and its retries, until the run ended. The
    next attempt now opens it again, with what was committed read back from its write-ahead log."""
    db = tmp_path / "fatal.duckdb"
    options = {"path": str(db), **({"commit_every": "1h"} if logged else {})}
    sink = DuckDBSink("duckdb", validate_options(DuckDBSinkOptions, options))
    payloads = list(VisitGenerator(seed=8, malformed_rate=0.1).messages(40))
    ids = [f"m{i}" for i in range(40)]
    halves = [[Message(p, i) for p, i in zip(payloads[at : at + 20], ids[at : at + 20], strict=True)] for at in (0, 20)]

    async def store(batch: Spool) -> None:  # as the runtime's worker does, with the log's commit at once
        await sink.write(batch)
        if logged:
            await sink.commit()

    await sink.open()
    try:
        first, second = sink.new_batch(), sink.new_batch()
        first.add(VisitParser().parse(halves[0], "test", 0))
        second.add(VisitParser().parse(halves[1], "test", 0))
        await store(first)
        assert sink._connection is not None
        sink._connection.execute("SET debug_checkpoint_abort = 'before_header'")
        with pytest.raises(duckdb.FatalException):
            sink._connection.execute("CHECKPOINT")
        with pytest.raises(duckdb.FatalException, match="invalidated"):
            await store(second)
        await store(second)  # the retry
    finally:
        await sink.close()
    assert table_counts(db) == expected_counts(payloads, ids)


def _huge_url_visits(count: int, start: int = 0) -> list[bytes]:
    """Visits whose page URL is a megabyte long, every other one with an event the parser refuses
    (its dead letter keeps the event, and so the URL)."""
    visits = []
    for i in range(start, start + count):
        url = f"https://e.com/{i}/" + "a" * 1_000_000
        event = {"event_type": "page_view", "timestamp": "2024-07-01T09:00:00Z", "details": {"page_url": url}}
        broken = {**event, "timestamp": "yesterday"}
        visits.append(msgspec.json.encode({"session_id": f"s{i}", "events": [event, broken] if i % 2 else [event]}))
    return visits


async def write_whole(db: Path, batches: list[list[bytes]], memory_limit: str, logged: bool) -> None:
    """Each list of payloads written to a sink as one batch (committed at once with a log): the
    runtime hands a sink at most 4 MiB of messages at a time (``api.PART_BYTES``), and a sink
    gathers those as they come, so only here is a batch's make-up certain."""
    options = {"path": str(db), "memory_limit": memory_limit, **({"commit_every": "1h"} if logged else {})}
    sink = DuckDBSink("duckdb", validate_options(DuckDBSinkOptions, options))
    await sink.open()
    try:
        async with sink.lifespan(RecordingSinkContext()):
            for number, payloads in enumerate(batches):
                batch = sink.new_batch()
                batch.add(VisitParser().parse([Message(p, f"{number}:{i}") for i, p in enumerate(payloads)], "test", 0))
                await sink.write(batch)
                batch.discard()
                if logged:
                    await sink.commit()
    finally:
        await sink.close()


def _huge_texts() -> list[bytes]:
    return _huge_url_visits(160) + list(VisitGenerator(seed=5, malformed_rate=0.1).messages(300))


@pytest.mark.anyio
@pytest.mark.parametrize("logged", [False, True], ids=["per-batch", "logged"])
async def test_a_batch_of_huge_texts_past_memory_limit_is_stored_in_parts_and_not_again(
    tmp_path: Path, logged: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """DuckDB keeps a transaction's long texts in memory and fails its commit past ``memory_limit``:
    such a batch stopped the pipeline, and a stream source would have sent it again for ever."""
    payloads, db = _huge_texts(), tmp_path / "huge.duckdb"
    await write_whole(db, [payloads], "128MB", logged)
    assert "inserting it in 16 parts" in caplog.text
    expected = expected_counts(payloads, [f"0:{i}" for i in range(len(payloads))])
    assert table_counts(db) == expected
    with duckdb.connect(str(db), read_only=True) as con:
        long_urls = con.execute("SELECT count(*) FROM events WHERE length(page_url) > 1000000").fetchone()
        long_dead = con.execute("SELECT count(*) FROM dead_letter WHERE length(payload) > 1000000").fetchone()
    assert long_urls == (160,) and long_dead == (80,)

    await write_whole(db, [payloads], "128MB", logged)  # delivered again
    assert table_counts(db) == expected


@pytest.mark.integration
@pytest.mark.parametrize("sink_options", ["", ", commit_every: 50ms"], ids=["per-batch", "logged"])
def test_a_run_of_huge_texts_past_memory_limit_completes_exactly_and_a_rerun_stores_nothing_twice(
    tmp_path: Path, sink_options: str
) -> None:
    """However its batches are made up: logged, the run's last commit ran DuckDB's checkpoint out of
    memory, which is fatal to the database, and the run failed; it is now opened again and the
    commit made in parts."""
    payloads = _huge_texts()
    source = tmp_path / "visits.jsonl"
    source.write_bytes(b"\n".join(payloads) + b"\n")
    db, pipeline = tmp_path / "huge.duckdb", tmp_path / "p.yaml"
    pipeline.write_text(
        f"sources: [{{type: file, path: '{source}', batch_bytes: 1GiB}}]\n"
        f"sinks: [{{type: duckdb, path: '{db}', memory_limit: 128MB{sink_options}}}]\n"
    )
    run = clickflow("run", "--no-progress", str(pipeline))
    assert run.returncode == 0, run.stderr
    expected = expected_counts(payloads, [f"{source}:{n}" for n in range(1, len(payloads) + 1)])
    assert table_counts(db) == expected

    again = clickflow("run", "--no-progress", str(pipeline))
    assert again.returncode == 0, again.stderr
    assert table_counts(db) == expected
    assert f"stored already (duckdb)  {expected['visits']:>9,}  (not stored again)" in again.stdout


@pytest.mark.anyio
async def test_a_batch_whose_commit_cannot_allocate_a_block_is_stored_in_parts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past ``memory_limit`` a commit may fail with DuckDB's "could not allocate block", without
    "Out of Memory": such a batch was retried whole until the sink failed. Here thirty messages of
    4 MB that are not JSON, each kept whole as a dead letter (5.3 MB in base64), in batches of
    twenty and ten: the second is the one."""
    payloads = [b"x%03d" % i + b"x" * (4 << 20) for i in range(30)]
    db = tmp_path / "large.duckdb"
    await write_whole(db, [payloads[:20], payloads[20:]], "60MB", logged=False)
    assert "in 16 parts (TransactionContext Error: Failed to commit: could not allocate block" in caplog.text
    assert table_counts(db) == {"visits": 0, "events": 0, "purchase_items": 0, "dead_letter": 30}
    with duckdb.connect(str(db), read_only=True) as con:
        kept = con.execute("SELECT min(length(payload)), max(length(payload)) FROM dead_letter").fetchone()
    assert kept == (len(base64.b64encode(payloads[0])),) * 2


@pytest.mark.anyio
async def test_after_a_checkpoint_out_of_memory_the_database_is_opened_again_and_the_batch_stored_in_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A checkpoint out of memory is fatal: every part of the batch would fail on the invalid
    database. The retry opens it again and inserts in parts from the first."""
    real_part, calls = tables._insert_part, []

    def insert_part(con: duckdb.DuckDBPyConnection, spooled: Any, counts: Any, of: int, part: int) -> int:
        calls.append(of)
        if len(calls) == 1:
            raise duckdb.FatalException("Failed to create checkpoint because of error: failed to pin block of 1 KiB")
        return real_part(con, spooled, counts, of, part)

    monkeypatch.setattr(tables, "_insert_part", insert_part)
    payloads = list(VisitGenerator(seed=3).messages(50))
    messages = [Message(p, f"m{i}") for i, p in enumerate(payloads)]
    db = tmp_path / "fatal.duckdb"
    sink = DuckDBSink("duckdb", DuckDBSinkOptions(path=str(db)))
    await sink.open()
    try:
        batch = sink.new_batch()
        batch.add(VisitParser().parse(messages, "test", 0))
        with pytest.raises(duckdb.FatalException):
            await sink.write(batch)
        await sink.write(batch)  # the sink worker's retry
    finally:
        await sink.close()
    assert calls == [1] + [16] * 16
    assert table_counts(db) == expected_counts(payloads, [m.message_id for m in messages])


@pytest.mark.integration
def test_a_second_run_on_the_same_database_refuses_at_once(tmp_path: Path) -> None:
    db, pipeline = tmp_path / "one.duckdb", tmp_path / "p.yaml"
    pipeline.write_text(
        "sources: [{type: simulator, visits_per_minute: 6000}]\n"
        f"sinks: [{{type: duckdb, path: '{db}', batch: {{max_age: 100ms}}}}]\n"
    )
    first = subprocess.Popen([*CLICKFLOW, "run", "--no-progress", str(pipeline)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not db.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.monotonic()
        second = clickflow("run", "--no-progress", str(pipeline))
        took = time.monotonic() - started
    finally:
        first.terminate()
        first.communicate(timeout=60)
    assert second.returncode == 1
    assert second.stderr.startswith("clickflow: sink 'duckdb' could not start: IO Error: Could not set lock")
    assert took < 10
    assert first.returncode == 0


def test_times_at_both_ends_of_the_range_are_stored_to_the_microsecond(tmp_path: Path) -> None:
    visit = dict(VALID_VISIT)
    times = ["9999-12-31T23:59:59.999999Z", "0001-01-01T00:00:00.000001", "1969-12-31T23:59:59.999999+00:00"]
    visit["events"] = [{**VALID_VISIT["events"][0], "timestamp": t} for t in times]
    rows = VisitParser().parse([Message(msgspec.json.encode(visit), "m")], "t", 0)
    sink = DuckDBSink("duckdb", DuckDBSinkOptions(path=str(tmp_path / "t.duckdb")))

    async def store() -> None:
        await sink.open()
        batch = sink.new_batch()
        batch.add(rows)
        await sink.write(batch)
        batch.discard()
        await sink.close()

    anyio.run(store)
    with duckdb.connect(str(tmp_path / "t.duckdb"), read_only=True) as con:
        stored = [
            r[0] for r in con.execute("SELECT epoch_us(event_timestamp) FROM events ORDER BY event_index").fetchall()
        ]
    assert stored == [row[7] for row in rows.tables["events"]]
    assert stored == [253402300799999999, -62135596799999999, -1]
