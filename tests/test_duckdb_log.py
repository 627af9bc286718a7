"""The DuckDB sink's ``commit_every``: batches are durable in a log at once, in the tables later."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

import clickflow_duckdb
from clickflow.api import RowBatch
from clickflow.config import Pipeline
from clickflow.options import OptionsError, validate_options
from clickflow.runtime import PipelineError
from clickflow.schema import TABLE_NAMES
from clickflow.testing import run_pipeline
from clickflow_duckdb import DuckDBSink, DuckDBSinkOptions, load_files, logwriter
from clickflow_duckdb.log import DamagedLog, LogWriter, records
from clickflow_duckdb.spool import SpoolFiles
from tests.conftest import table_counts
from tests.fakes import RecordingSinkContext
from tests.test_duckdb_sink import parsed

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "uvloop"])
def anyio_backend(request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """On asyncio's loop and on uvloop's (a run's default): the log's writer is a child process of either."""
    if request.param == "uvloop":
        import uvloop

        return "asyncio", {"loop_factory": uvloop.new_event_loop}
    return "asyncio", {}


EMPTY = {"visits": 0, "events": 0, "purchase_items": 0, "dead_letter": 0}


@asynccontextmanager
async def logged_sink(
    path: Path, commit_every: str = "1h", context: RecordingSinkContext | None = None
) -> AsyncIterator[DuckDBSink]:
    """A sink with a log, open and in its lifespan, as the runtime runs it."""
    sink = DuckDBSink("duckdb", validate_options(DuckDBSinkOptions, {"path": str(path), "commit_every": commit_every}))
    await sink.open()
    try:
        async with sink.lifespan(context or RecordingSinkContext()):
            yield sink
    finally:
        await sink.close()


async def write(sink: DuckDBSink, rows: RowBatch) -> None:
    batch = sink.new_batch()
    batch.add(rows)
    await sink.write(batch)
    batch.discard()


def stored(sink: DuckDBSink) -> dict[str, int]:
    cursor = sink._cursor()
    return {name: cursor.execute(f"SELECT count(*) FROM {name}").fetchall()[0][0] for name in EMPTY}


def has_log(db: Path) -> bool:
    return Path(f"{db}.log").exists()


def logged_batches(db: Path) -> int:
    """Batches in the log: the records of its segments."""
    return sum(1 for segment in Path(f"{db}.log").glob("*.segment") for _ in records(str(segment)))


async def test_a_written_batch_is_in_the_log_until_the_commit(
    tmp_path: Path, visit: Callable[..., dict[str, Any]]
) -> None:
    db = tmp_path / "db.duckdb"
    async with logged_sink(db) as sink:
        await write(sink, parsed([visit(), "garbage", visit()]))
        assert stored(sink) == EMPTY  # write returned: the batch is durable, in the log only
        assert logged_batches(db) == 1
    assert table_counts(db) == {"visits": 2, "events": 6, "purchase_items": 2, "dead_letter": 1}
    assert not has_log(db)  # every batch inserted: the log is gone


async def test_the_log_is_inserted_every_commit_every(tmp_path: Path, visit: Callable[..., dict[str, Any]]) -> None:
    async with logged_sink(tmp_path / "db.duckdb", commit_every="50ms") as sink:
        await write(sink, parsed([visit()], prefix="a"))
        await write(sink, parsed([visit(), visit()], prefix="b"))
        with anyio.fail_after(10):  # the commit's rows are visible before it removes the log's segments
            while stored(sink)["visits"] < 3 or logged_batches(tmp_path / "db.duckdb"):  # noqa: ASYNC110  polling
                await anyio.sleep(0.02)
        assert stored(sink) == {"visits": 3, "events": 9, "purchase_items": 3, "dead_letter": 0}
        assert logged_batches(tmp_path / "db.duckdb") == 0


async def test_redelivered_messages_are_stored_once_across_logged_batches(
    tmp_path: Path, visit: Callable[..., dict[str, Any]]
) -> None:
    first = parsed([visit(), "not json", visit()])
    overlapping = parsed([visit(), "not json", visit(), visit()])  # m0..m2 again, m3 new
    db = tmp_path / "db.duckdb"
    context = RecordingSinkContext()
    async with logged_sink(db, context=context) as sink:
        await write(sink, first)
        await write(sink, first)  # every message in the log already: nothing to log, and no commit
        assert stored(sink) == EMPTY
        assert logged_batches(db) == 1
        await write(sink, overlapping)  # m0..m2 left out, m3 logged
        assert logged_batches(db) == 2
        await sink.commit()
        await write(sink, overlapping)  # repeats what the tables hold, not the log: logged, anti-joined later
        await write(sink, parsed([visit()], prefix="other"))
        assert logged_batches(db) == 2
    assert table_counts(db) == {"visits": 4, "events": 12, "purchase_items": 4, "dead_letter": 1}
    # every visit written is stored, or told to the runtime as stored already: 2 + 2 + 3 + 3 + 1 written
    assert context.visits_stored_already == 11 - 4


async def test_a_batch_that_gathered_a_message_the_log_took_meanwhile_is_logged_after_a_commit(
    tmp_path: Path, visit: Callable[..., dict[str, Any]]
) -> None:
    first = parsed([visit(), "not json", visit()])
    db = tmp_path / "db.duckdb"
    async with logged_sink(db) as sink:
        gathering = sink.new_batch()
        gathering.add(first)  # the log does not hold these yet
        await write(sink, first)  # now it does
        await sink.write(gathering)  # shares messages with the log: the log is committed first
        gathering.discard()
        assert stored(sink) == {"visits": 2, "events": 6, "purchase_items": 2, "dead_letter": 1}
        assert logged_batches(db) == 1
    assert table_counts(db) == {"visits": 2, "events": 6, "purchase_items": 2, "dead_letter": 1}


def disk_full(*_: Any) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("fault", ["none", "copy_write", "copy_flush", "insert_after_flush"])
async def test_a_commit_inserts_the_batches_copies_and_reads_the_log_back_only_when_one_is_missing(
    tmp_path: Path, visit: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    """Reading the records back holds the GIL against the event loop, so a commit inserts the
    copies made as the batches were logged; a copy that could not be written only costs that."""
    read_back: list[int] = []
    real_split = clickflow_duckdb.split

    def split(logged: Any, *rest: Any) -> SpoolFiles:
        read_back.append(len(logged.segments))
        return real_split(logged, *rest)

    monkeypatch.setattr(clickflow_duckdb, "split", split)
    db = tmp_path / "db.duckdb"
    async with logged_sink(db) as sink:
        await write(sink, parsed([visit()], prefix="a"))
        with monkeypatch.context() as patched:
            if fault == "copy_write":
                patched.setattr(SpoolFiles, "write", disk_full)
            await write(sink, parsed([visit(), "garbage"], prefix="b"))
        with monkeypatch.context() as patched:
            if fault == "copy_flush":  # the disk full as the copy is flushed; room made before the read-back
                real_close = SpoolFiles.close

                def close_once(files: SpoolFiles) -> None:
                    patched.setattr(SpoolFiles, "close", real_close)
                    disk_full()

                patched.setattr(SpoolFiles, "close", close_once)
            if fault == "insert_after_flush":  # the batches go back to the log, their copies closed
                patched.setattr(clickflow_duckdb, "insert", disk_full)
                with pytest.raises(OSError, match="No space"):
                    await sink.commit()
                assert stored(sink) == EMPTY
            else:
                await sink.commit()
        await write(sink, parsed([visit()], prefix="c"))  # after a failed commit, into a copy of its own
        await sink.commit()
        assert stored(sink) == {"visits": 3, "events": 9, "purchase_items": 3, "dead_letter": 1}
        assert logged_batches(db) == 0
    assert read_back == ([1] if fault in ("copy_write", "copy_flush") else [])  # one segment, both batches
    assert table_counts(db) == {"visits": 3, "events": 9, "purchase_items": 3, "dead_letter": 1}


KILLED_RUN = """
import anyio, json, os, sys, types
from clickflow.options import validate_options
from clickflow_duckdb import DuckDBSink, DuckDBSinkOptions
from tests.test_duckdb_sink import parsed

async def main():
    sink = DuckDBSink("duckdb", validate_options(DuckDBSinkOptions, {"path": sys.argv[1], "commit_every": "1h"}))
    await sink.open()
    async with sink.lifespan(types.SimpleNamespace(registry=None)):
        for prefix in "ab":
            batch = sink.new_batch()
            batch.add(parsed(json.loads(sys.argv[2]), prefix=prefix))
            await sink.write(batch)
        os._exit(9)  # killed after the writes returned, before any commit

anyio.run(main)
"""


def killed_run(db: Path, visits: list[Any]) -> None:
    """Two batches of ``visits`` logged (prefixed a and b), then the process killed."""
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_RUN, str(db), json.dumps(visits)],
        cwd=Path(__file__).parent.parent, capture_output=True, text=True,
    )  # fmt: skip
    assert killed.returncode == 9, killed.stderr
    assert logged_batches(db) == 2 and table_counts(db) == EMPTY


async def reopen(db: Path) -> None:
    """The next local run, without a log of its own: its sink opens and closes."""
    sink = DuckDBSink("duckdb", DuckDBSinkOptions(path=str(db)))
    try:
        await sink.open()  # inserts what the killed run logged: those batches were acknowledged
    finally:
        await sink.close()  # as the runtime does, whether open worked or not


@pytest.mark.parametrize("opener", ["sink", "beam_load"])
def test_a_killed_runs_log_is_inserted_when_the_database_is_next_opened(
    tmp_path: Path, visit: Callable[..., dict[str, Any]], opener: str
) -> None:
    db = tmp_path / "db.duckdb"
    killed_run(db, [visit(), "garbage", visit()])
    (Path(f"{db}.log") / "notes.txt").write_text("not a batch")  # something else left there is kept

    if opener == "sink":
        anyio.run(reopen, db)
    else:  # the last step of `--runner beam` into the same file, here of a run that read nothing
        load_files(DuckDBSinkOptions(path=str(db)), dict.fromkeys(TABLE_NAMES, ""), dict.fromkeys(TABLE_NAMES, 0))
    assert table_counts(db) == {"visits": 4, "events": 12, "purchase_items": 4, "dead_letter": 2}
    assert os.listdir(f"{db}.log") == ["notes.txt"]


@pytest.mark.parametrize("damage", ["cut_short", "zeros_after", "flipped_in_the_first"])
def test_a_damaged_last_record_is_dropped_and_earlier_damage_stops_the_insert(
    tmp_path: Path, visit: Callable[..., dict[str, Any]], damage: str
) -> None:
    """Only a segment's last record can be damaged by a kill or a crash: it was never acknowledged."""
    db = tmp_path / "db.duckdb"
    killed_run(db, [visit(), "garbage", visit()])
    (segment,) = Path(f"{db}.log").glob("*.segment")
    logged = segment.read_bytes()
    first_end = next(records(str(segment)))[0]
    if damage == "cut_short":  # killed while a third batch was being appended
        segment.write_bytes(logged + logged[: first_end - 7])
    elif damage == "zeros_after":  # the system stopped after the file grew, before its data was written
        segment.write_bytes(logged + bytes(4096))
    else:  # a bit flipped in the first batch's rows
        segment.write_bytes(logged[:100] + bytes([logged[100] ^ 1]) + logged[101:])

    if damage == "flipped_in_the_first":
        with pytest.raises(DamagedLog, match=r"record at byte 0 is damaged \(CRC mismatch\)"):
            anyio.run(reopen, db)
        assert segment.exists() and table_counts(db) == EMPTY  # left for the operator, nothing half-inserted
    else:
        anyio.run(reopen, db)
        assert table_counts(db) == {"visits": 4, "events": 12, "purchase_items": 4, "dead_letter": 2}
        assert not has_log(db)


async def test_a_failed_commit_keeps_the_batches_for_the_next(
    tmp_path: Path, visit: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "db.duckdb"
    async with logged_sink(db) as sink:
        await write(sink, parsed([visit()], prefix="a"))
        real_insert = clickflow_duckdb.insert_logged
        monkeypatch.setattr(
            clickflow_duckdb, "insert_logged", lambda *_: (_ for _ in ()).throw(OSError(28, "disk full"))
        )
        with pytest.raises(OSError, match="disk full"):
            await sink.commit()
        monkeypatch.setattr(clickflow_duckdb, "insert_logged", real_insert)
        await write(sink, parsed([visit()], prefix="b"))
        assert logged_batches(db) == 2
        await sink.commit()
        assert stored(sink) == {"visits": 2, "events": 6, "purchase_items": 2, "dead_letter": 0}


def test_a_log_that_cannot_be_inserted_at_the_end_fails_the_run_with_one_line_and_waits_for_the_next(
    tmp_path: Path, pipeline: Callable[..., Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk at the last commit: the run used to end in a traceback. Its batches were
    acknowledged, so they stay logged, and the next open inserts every one."""
    db = tmp_path / "db.duckdb"
    real_insert = clickflow_duckdb.insert_logged

    def disk_full(con: Any, logged: Any, *rest: Any) -> None:
        if sum(logged.counts.values()):
            raise OSError(28, "disk full")
        real_insert(con, logged, *rest)

    monkeypatch.setattr(clickflow_duckdb, "insert_logged", disk_full)
    sink = f"type: duckdb, path: '{db}', commit_every: 1h"
    text = f"sources: [{{type: simulator, count: 50, seed: 3}}]\nsinks: [{{{sink}}}]"
    with pytest.raises(PipelineError) as failed:
        run_pipeline(pipeline(text))
    assert str(failed.value) == (
        "sink 'duckdb' failed as it ended: cannot insert the batch log ([Errno 28] disk full); its batches stay in "
        f"{db}.log, and are inserted when the sink next opens"
    )
    assert has_log(db)
    monkeypatch.setattr(clickflow_duckdb, "insert_logged", real_insert)
    anyio.run(reopen, db)
    assert table_counts(db)["visits"] == 50
    assert not has_log(db)


def test_commit_every_must_be_longer_than_zero() -> None:
    with pytest.raises(OptionsError, match="must be longer than 0"):
        validate_options(DuckDBSinkOptions, {"commit_every": "0s"})
    assert validate_options(DuckDBSinkOptions, {"commit_every": "250ms"}).commit_every == timedelta(milliseconds=250)


def serve(requests: list[bytes]) -> list[int]:
    """The log writer's answers to ``requests``, served in this process."""
    replies = io.BytesIO()
    logwriter.serve(io.BytesIO(b"".join(requests)), replies)
    answers = replies.getvalue()
    return [int.from_bytes(answers[i : i + 8], "little") for i in range(0, len(answers), 8)]


def open_request(path: Path) -> bytes:
    return logwriter.request(logwriter.OPEN, len(bytes(path))) + bytes(path)


def append_request(record: bytes) -> bytes:
    return logwriter.request(logwriter.APPEND, len(record)) + record


@pytest.mark.parametrize("failing", ["write", "fdatasync"])
def test_a_failed_append_is_cut_off_and_the_next_request_is_served(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A record the writer could not write or sync is answered with its errno and leaves nothing
    in the segment; the writer reads past it to the next request. Records come in pieces."""
    monkeypatch.setattr(logwriter, "PIECE", 10)
    real = getattr(os, failing)
    calls = 0

    def fails_once(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # the failed record's second piece, or the second record's sync
            raise OSError(28, "No space left on device")
        return real(*args)

    first, second = b"first record, in three pieces", b"second, also in pieces"
    monkeypatch.setattr(os, failing, fails_once)
    segment = tmp_path / "1.segment"
    answers = serve([open_request(segment), append_request(first), append_request(second), append_request(b"third")])
    if failing == "write":  # the first record failed in its second piece
        assert answers == [0, 28, 0, 0] and segment.read_bytes() == second + b"third"
    else:  # the second record failed to sync
        assert answers == [0, 0, 28, 0] and segment.read_bytes() == first + b"third"


def test_a_record_is_written_whole_through_short_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data)[:7]))  # as a kernel may
    record = b"".join(b"%d," % i for i in range(3000))
    segment = tmp_path / "1.segment"
    assert serve([open_request(segment), append_request(record)]) == [0, 0]
    assert segment.read_bytes() == record


def test_the_writer_refuses_an_unknown_request_and_an_append_without_a_segment(tmp_path: Path) -> None:
    assert serve([append_request(b"rows"), logwriter.request(b"X", 0)]) == [errno.EBADF, errno.EPROTO]


def writer_pids() -> list[int]:
    """This process's log writer children (threads and children may end while they are listed)."""

    def read(path: str) -> bytes:
        try:
            return Path(path).read_bytes()
        except (FileNotFoundError, ProcessLookupError):
            return b""

    children = [
        int(pid) for task in os.listdir("/proc/self/task") for pid in read(f"/proc/self/task/{task}/children").split()
    ]
    return [pid for pid in children if b"logwriter.py" in read(f"/proc/{pid}/cmdline")]


async def test_a_writer_process_that_dies_fails_one_write_and_its_retry_is_logged_once(
    tmp_path: Path, visit: Callable[..., dict[str, Any]]
) -> None:
    db = tmp_path / "db.duckdb"
    async with logged_sink(db) as sink:
        await write(sink, parsed([visit()], prefix="a"))
        (pid,) = writer_pids()
        os.kill(pid, signal.SIGKILL)  # the OOM killer, say
        batch = sink.new_batch()
        batch.add(parsed([visit(), visit()], prefix="b"))
        with pytest.raises(OSError, match=r"cannot log a batch to .*\.segment: the log's writer process stopped"):
            await sink.write(batch)
        await sink.write(batch)  # the sink worker's retry: a new writer, a new segment
        assert writer_pids() != [pid] and logged_batches(db) == 2
    assert table_counts(db) == {"visits": 3, "events": 9, "purchase_items": 3, "dead_letter": 0}
    assert writer_pids() == []  # closed with the sink


DIES_AFTER_SYNC = """
import os, sys
sys.path.insert(0, {directory!r})
import logwriter

real_append, appends = logwriter.Segment.append, 0

def append(self, requests, length):
    global appends
    real_append(self, requests, length)
    appends += 1
    if appends == 2:
        os._exit(9)  # killed once the record is synced, before it is answered for

logwriter.Segment.append = append
logwriter.serve(sys.stdin.buffer, sys.stdout.buffer)
"""


async def test_a_record_synced_by_a_writer_that_died_before_answering_is_cut_off_and_stored_once(
    tmp_path: Path, visit: Callable[..., dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its batch is given back and logged again: were the record left, a run killed before its
    next commit would leave the batch twice in its segments, and the next open insert it twice."""
    script = tmp_path / "dies_after_sync.py"
    script.write_text(DIES_AFTER_SYNC.format(directory=str(Path(logwriter.__file__).parent)))
    monkeypatch.setattr(logwriter, "__file__", str(script))
    db, after_a_kill = tmp_path / "db.duckdb", tmp_path / "killed.duckdb"
    async with logged_sink(db) as sink:
        await write(sink, parsed([visit()], prefix="a"))
        batch = sink.new_batch()
        batch.add(parsed([visit(), visit()], prefix="b"))
        with pytest.raises(OSError, match="the log's writer process stopped"):
            await sink.write(batch)
        await sink.write(batch)  # the retry, through a new writer (which would die at its second append)
        assert logged_batches(db) == 2
        shutil.copytree(f"{db}.log", f"{after_a_kill}.log")  # what a run killed now leaves
    await reopen(after_a_kill)
    assert table_counts(after_a_kill) == table_counts(db) == {
        "visits": 3, "events": 9, "purchase_items": 3, "dead_letter": 0}  # fmt: skip


async def test_a_request_cancelled_midway_ends_its_writer_and_the_next_request_starts_another(tmp_path: Path) -> None:
    writer = LogWriter()
    try:
        await writer.open(str(tmp_path / "1.segment"))
        (first,) = writer_pids()
        with anyio.CancelScope() as scope:
            scope.cancel()  # felt once the pipe is full, part of the way into the record
            await writer.append([bytes(8 << 20)])
        with anyio.fail_after(10):
            while first in writer_pids():  # noqa: ASYNC110  killed; no event to wait on
                await anyio.sleep(0.01)
        await writer.open(str(tmp_path / "2.segment"))
        await writer.append([b"whole"])
        assert (tmp_path / "2.segment").read_bytes() == b"whole"
    finally:
        await writer.aclose()
    assert writer_pids() == []
