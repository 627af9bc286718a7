"""The DuckDB sink's batch log, for ``commit_every``: durable at once, inserted together later.

A DuckDB transaction costs a few milliseconds per statement and per commit, whatever its size,
which bounds a stream of small batches (the push endpoint answers each request only once its
rows are stored). With a log, a batch gathers in memory as spool lines (``LogBatch``) and is
appended to the log's current segment, ``DATABASE.log/NNNNNNNNNNNN.segment``, as one record, then
fdatasynced: one write and one sync per batch, whatever its tables. The write returns and the
batch is acknowledged. Every ``commit_every`` the sink starts a new segment and inserts the
finished ones in one transaction, then removes them. A run that is killed leaves its segments,
which are inserted when the database is next opened, so an acknowledged batch is never lost.

A record is a header (a magic number, each table's bytes and rows, a CRC-32 of the lines) and
each table's lines. Only the last record of a segment can be incomplete: a record is appended
after the one before it was synced, and a failed append is cut off (or its segment closed). So
a damaged last record was never acknowledged and is dropped; damage before it stops the insert
with an error, and the segment stays where it is.

Logged batches never share a message: a batch with a message already in the log is logged only
after the log is committed, so the insert's anti-join against the tables drops every repeat.
"""

from __future__ import annotations

import contextlib
import logging
import os
import struct
import tempfile
import zlib
from collections.abc import Iterator

from clickflow.schema import TABLE_NAMES
from clickflow_duckdb.spool import Spool

log = logging.getLogger(__name__)

SUFFIX = ".segment"
_HEADER = struct.Struct(f"<4s{len(TABLE_NAMES)}Q{len(TABLE_NAMES)}QI")
"""Magic, each table's bytes of lines, each table's rows, CRC-32 of all the lines."""
_MAGIC = b"CFL1"
_IOV_MAX = 1024
"""Buffers one ``writev`` takes at most (Linux's limit)."""


class LogBatch(Spool):
    """A batch for the log: each table's spool lines, in memory until appended."""

    def __init__(self) -> None:
        super().__init__()
        self._lines: dict[str, list[bytes]] = {name: [] for name in TABLE_NAMES}

    def _write(self, table: str, lines: bytes) -> None:
        self._lines[table].append(lines)

    def record(self) -> list[bytes]:
        """The batch as a log record: its header, then each table's lines (not copied again)."""
        chunks = [lines for name in TABLE_NAMES for lines in self._lines[name]]
        sizes = [sum(map(len, self._lines[name])) for name in TABLE_NAMES]
        counts = [self._counts[name] for name in TABLE_NAMES]
        return [_HEADER.pack(_MAGIC, *sizes, *counts, _crc(chunks)), *chunks]

    def discard(self) -> None:
        self._lines = {name: [] for name in TABLE_NAMES}


class Logged:
    """Batches in the log: their segments (each with the bytes of its whole records), rows per
    table, and the messages they hold."""

    def __init__(self) -> None:
        self.segments: dict[str, int] = {}
        self.counts = dict.fromkeys(TABLE_NAMES, 0)
        self.messages: set[str] = set()

    def add(self, segment: str, size: int, counts: dict[str, int], messages: set[str]) -> None:
        self.segments[segment] = size
        for name, count in counts.items():
            self.counts[name] += count
        self.messages |= messages

    def merge(self, other: Logged) -> None:
        self.segments = {**other.segments, **self.segments}
        for name, count in other.counts.items():
            self.counts[name] += count
        self.messages |= other.messages


class DamagedLog(Exception):
    """A record before a segment's last is damaged: acknowledged rows may be in it or after it."""


def log_directory(database: str) -> str:
    return f"{database}.log"


def left_behind(database: str) -> Logged:
    """Segments a killed run logged but did not insert, with their rows counted from the records.
    Looked for whatever this run's ``commit_every``: they were acknowledged."""
    directory = log_directory(database)
    logged = Logged()
    if database == ":memory:" or not os.path.isdir(directory):
        return logged
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith(SUFFIX) and os.path.isfile(path):
            whole, counts = 0, dict.fromkeys(TABLE_NAMES, 0)
            for end, record_counts, _ in records(path):
                whole = end
                for table, count in zip(TABLE_NAMES, record_counts, strict=True):
                    counts[table] += count
            logged.add(path, whole, counts, set())
    return logged


def records(path: str, size: int | None = None) -> Iterator[tuple[int, tuple[int, ...], list[bytes]]]:
    """A segment's whole records, one at a time, up to ``size`` bytes (all of them if None): for
    each, where it ends, its rows per table and its lines per table. A damaged last record is dropped."""
    tables = len(TABLE_NAMES)
    with open(path, "rb") as file:
        end = os.fstat(file.fileno()).st_size if size is None else size
        offset = 0
        while offset < end:
            header = file.read(min(_HEADER.size, end - offset))
            fields = _HEADER.unpack(header) if len(header) == _HEADER.size else None
            lengths = fields[1 : 1 + tables] if fields else ()
            record_end = offset + _HEADER.size + sum(lengths)
            lines = [file.read(length) for length in lengths] if fields and record_end <= end else []
            damage = (
                "cut short" if fields is None or record_end > end
                else "no record starts there" if fields[0] != _MAGIC
                else "CRC mismatch" if _crc(lines) != fields[-1]
                else None
            )  # fmt: skip
            if damage is None:
                assert fields is not None
                yield record_end, fields[1 + tables : 1 + 2 * tables], lines
                offset = record_end
                continue
            file.seek(offset)
            if size is None and _is_tail(file.read(), fields):
                log.warning("%s: dropped an incomplete last record (%d bytes, never acknowledged)", path, end - offset)
                return
            raise DamagedLog(f"{path}: the record at byte {offset} is damaged ({damage}); the log is left as it is")


def _crc(chunks: list[bytes]) -> int:
    crc = 0
    for chunk in chunks:
        crc = zlib.crc32(chunk, crc)
    return crc


def _is_tail(rest: bytes, fields: tuple[int | bytes, ...] | None) -> bool:
    """Whether a damaged record is the segment's last: it runs to the end, or only zeros follow
    (a file system may extend a file with zeros when the system stops)."""
    if fields is None or not rest.strip(b"\0"):
        return True
    lengths = fields[1 : 1 + len(TABLE_NAMES)]
    return fields[0] == _MAGIC and _HEADER.size + sum(lengths) >= len(rest)  # type: ignore[arg-type]


def split(logged: Logged, directory: str) -> dict[str, str]:
    """The logged rows as one spool file per table in ``directory``, for DuckDB's JSON reader."""
    paths = {name: os.path.join(directory, f"{name}.ndjson") for name in TABLE_NAMES}
    files = {name: open(path, "wb") for name, path in paths.items()}  # noqa: SIM115
    try:
        for segment, size in logged.segments.items():
            for _, _, lines in records(segment, size):
                for name, table_lines in zip(TABLE_NAMES, lines, strict=True):
                    files[name].write(table_lines)
    finally:
        for file in files.values():
            file.close()
    return paths


def remove(logged: Logged) -> None:
    """Drop segments once their rows are committed to the tables."""
    for segment in logged.segments:
        os.remove(segment)


def remove_if_empty(directory: str) -> None:
    """Remove a log's directory once every segment in it is inserted."""
    with contextlib.suppress(OSError):
        os.rmdir(directory)


class BatchLog:
    """``DATABASE.log/``: synced batches waiting to be inserted. Not thread-safe: the sink calls
    ``append`` in a thread, never while it calls ``take``, and keeps the bookkeeping on its event loop."""

    def __init__(self, database: str) -> None:
        if database == ":memory:":
            self.directory = tempfile.mkdtemp(prefix="clickflow-duckdb-log-")
        else:
            self.directory = log_directory(database)
            if not os.path.isdir(self.directory):
                os.mkdir(self.directory)
                _fsync(os.path.dirname(os.path.abspath(self.directory)), os.O_RDONLY | os.O_DIRECTORY)
        self.pending = Logged()
        self.taken: Logged | None = None
        """Batches being inserted: until that ends, a new batch must not share their messages either."""
        existing = [int(name[: -len(SUFFIX)]) for name in os.listdir(self.directory) if name.endswith(SUFFIX)]
        self._sequence = max(existing, default=0)
        self._segment: str | None = None
        self._fd = -1
        self._size = 0

    def overlaps(self, batch: Spool) -> bool:
        return any(not logged.messages.isdisjoint(batch.messages) for logged in (self.pending, self.taken) if logged)

    def append(self, batch: LogBatch) -> None:
        """Make a batch durable in the current segment (blocking: run it in a thread); then ``add``."""
        record = batch.record()
        segment = self._segment or self._open_segment()
        try:
            _write_all(self._fd, record)
            os.fdatasync(self._fd)
        except OSError as exc:
            try:  # no part of an unacknowledged record may stay before later ones
                os.ftruncate(self._fd, self._size)
            except OSError:
                self._close_segment()
            raise OSError(exc.errno, f"cannot log a batch to {segment}: {exc.strerror}") from exc
        self._size += sum(map(len, record))

    def add(self, batch: LogBatch) -> None:
        """Bookkeeping for a batch ``append`` made durable."""
        assert self._segment is not None
        self.pending.add(self._segment, self._size, batch.counts(), batch.messages)

    def take(self) -> Logged:
        """The pending batches, to be inserted; then ``committed`` or ``give_back``. The next batch
        starts a new segment."""
        self._close_segment()
        self.taken, self.pending = self.pending, Logged()
        return self.taken

    def committed(self) -> None:
        self.taken = None

    def give_back(self, logged: Logged) -> None:
        """Batches that could not be inserted: pending again, with those logged since."""
        self.pending.merge(logged)
        self.taken = None

    def close(self) -> None:
        self._close_segment()

    def _open_segment(self) -> str:
        self._sequence += 1
        segment = os.path.join(self.directory, f"{self._sequence:012d}{SUFFIX}")
        try:
            self._fd = os.open(segment, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
            self._segment, self._size = segment, 0
            _fsync(self.directory, os.O_RDONLY | os.O_DIRECTORY)  # the new file's name is durable too
        except OSError as exc:
            raise OSError(exc.errno, f"cannot start a log segment {segment}: {exc.strerror}") from exc
        return segment

    def _close_segment(self) -> None:
        if self._segment is not None:
            os.close(self._fd)
            if not self._size:  # nothing appended (or the only append failed): nothing to insert
                with contextlib.suppress(OSError):
                    os.remove(self._segment)
            self._segment, self._fd = None, -1


def _write_all(fd: int, chunks: list[bytes]) -> None:
    """``chunks``, one after another, in as few system calls as the kernel allows."""
    buffers: list[bytes | memoryview] = list(chunks)
    first = 0
    while first < len(buffers):
        written = os.writev(fd, buffers[first : first + _IOV_MAX])
        while first < len(buffers) and written >= len(buffers[first]):
            written -= len(buffers[first])
            first += 1
        if written:  # a short write ended inside this buffer
            buffers[first] = memoryview(buffers[first])[written:]


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
