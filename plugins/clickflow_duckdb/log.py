"""The DuckDB sink's batch log, for ``commit_every``: durable at once, inserted together later.

A DuckDB transaction costs a few milliseconds per statement and per commit, whatever its size,
which bounds a stream of small batches (the push endpoint answers each request only once its
rows are stored). With a log, a batch gathers in memory as spool lines (``LogBatch``) and is
appended to the log's current segment, ``DATABASE.log/NNNNNNNNNNNN.segment``, as one record, then
fdatasynced: one write and one sync per batch, whatever its tables, done by a child process
(``logwriter``) so that the event loop never hands the GIL to a thread for it. The append returns
and the batch is acknowledged. Its lines are also copied, unsynced, into a spool file per table
(``Logged.copies``). Every ``commit_every`` the sink starts a new segment and inserts the copies
of the finished ones in one transaction, then removes both: reading the records back would hold
the GIL against the event loop. A run that is killed leaves its segments, which are read back
and inserted when the database is next opened, so an acknowledged batch is never lost.

A record is a header (a magic number, each table's bytes and rows, a CRC-32 of the lines) and
each table's lines. Only the last record of a segment can be incomplete: a record is appended
after the one before it was synced, and after a failed append the segment is cut back to its
acknowledged records (even a record synced by a writer that died before answering for it: its
batch is logged again) and the next batch starts a new segment. So a damaged last record was
never acknowledged and is dropped; damage before it stops the insert with an error, and the
segment stays where it is.

Logged batches never share a message, so the insert's anti-join against the tables drops every
repeat: a message the log holds when it is added to a batch is left out of it (its rows are
durable already), and a batch that shares one with the log all the same (logged while the batch
gathered) is logged only after the log is committed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Collection, Iterable, Iterator, Mapping

import anyio
from anyio.abc import Process
from anyio.streams.buffered import BufferedByteReceiveStream

from clickflow.logs import describe
from clickflow.schema import TABLE_NAMES
from clickflow_duckdb import logwriter
from clickflow_duckdb.spool import Spool, SpoolFiles

log = logging.getLogger(__name__)

SUFFIX = ".segment"
_HEADER = struct.Struct(f"<4s{len(TABLE_NAMES)}Q{len(TABLE_NAMES)}QI")
"""Magic, each table's bytes of lines, each table's rows, CRC-32 of all the lines."""
_MAGIC = b"CFL1"


class LogBatch(Spool):
    """A batch for the log: each table's spool lines, in memory until appended."""

    def __init__(self, log: BatchLog) -> None:
        super().__init__()
        self._lines: dict[str, list[bytes]] = {name: [] for name in TABLE_NAMES}
        self._log = log

    def held(self, messages: Collection[str]) -> set[str]:
        """Also those the log holds: a redelivery of a logged message is answered without a commit."""
        return super().held(messages) | self._log.holding(messages)

    def _write(self, table: str, lines: bytes) -> None:
        self._lines[table].append(lines)

    def record(self) -> list[bytes]:
        """The batch as a log record: its header, then each table's lines (not copied again)."""
        chunks = [lines for name in TABLE_NAMES for lines in self._lines[name]]
        sizes = [sum(map(len, self._lines[name])) for name in TABLE_NAMES]
        counts = [self._counts[name] for name in TABLE_NAMES]
        return [_HEADER.pack(_MAGIC, *sizes, *counts, _crc(chunks)), *chunks]

    def lines(self) -> Mapping[str, list[bytes]]:
        return self._lines

    def discard(self) -> None:
        self._lines = {name: [] for name in TABLE_NAMES}


_COPY_BUFFER = 1 << 18
"""A copy is written a batch at a time, often a few hundred bytes: flushed in larger writes."""


class Logged:
    """Batches in the log: their segments (each with the bytes of its whole records), rows per
    table, the messages they hold, and their copies."""

    def __init__(self, copied: bool = True) -> None:
        self.segments: dict[str, int] = {}
        self.counts = dict.fromkeys(TABLE_NAMES, 0)
        self.messages: set[str] = set()
        self.copies: list[SpoolFiles] | None = [] if copied else None
        """The batches' lines again, written as each batch was logged (the last copy for those
        logged since): the insert reads these, where reading the records back and checking
        their CRCs is Python that holds the GIL against the event loop (a tenth of a loaded push
        endpoint's time). Never synced: None once a batch is missing from them (a copy could not
        be written, or a killed run's segments), and the insert reads the segments back into one."""

    def add(self, segment: str, size: int, counts: dict[str, int], messages: set[str]) -> None:
        self.segments[segment] = size
        for name, count in counts.items():
            self.counts[name] += count
        self.messages |= messages

    def copy(self, batch: LogBatch, work: str | None) -> None:
        """Write a logged batch into the copy; a failure (a full disk) only costs the read-back."""
        if self.copies is None:
            return
        try:
            if not self.copies or self.copies[-1].closed:  # closed: given back after a failed insert
                self.copies.append(SpoolFiles(work, prefix="log-copy-", buffering=_COPY_BUFFER))
            for name, chunks in batch.lines().items():
                for lines in chunks:
                    self.copies[-1].write(name, lines)
        except OSError as exc:
            log.warning("cannot copy a logged batch for the commit (%s): the commit reads the log back", exc)
            self.drop_copies()

    def copied(self) -> bool:
        """Whether the copies hold every batch, closed and ready to be read; a copy that cannot be
        flushed is dropped."""
        try:
            for copy in self.copies or ():
                copy.close()
        except OSError as exc:
            log.warning("cannot copy the logged batches for the commit (%s): it reads the log back", exc)
            self.drop_copies()
        return self.copies is not None

    def copy_paths(self) -> dict[str, list[str]]:
        """Each table's files in the copies (``copied`` first)."""
        assert self.copies is not None
        return {name: [copy.paths[name] for copy in self.copies if name in copy.written()] for name in TABLE_NAMES}

    def drop_copies(self) -> None:
        for copy in self.copies or ():
            copy.discard()
        self.copies = None

    def merge(self, other: Logged) -> None:
        self.segments = {**other.segments, **self.segments}
        for name, count in other.counts.items():
            self.counts[name] += count
        self.messages |= other.messages
        if self.copies is None or other.copies is None:
            other.drop_copies()
            self.drop_copies()
        else:
            self.copies[:0] = other.copies


class DamagedLog(Exception):
    """A record before a segment's last is damaged: acknowledged rows may be in it or after it."""


def log_directory(database: str) -> str:
    return f"{database}.log"


def left_behind(database: str) -> Logged:
    """Segments a killed run logged but did not insert, with their rows counted from the records.
    Looked for whatever this run's ``commit_every``: they were acknowledged."""
    directory = log_directory(database)
    logged = Logged(copied=False)  # batches no copy was made of
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


def split(logged: Logged, work: str | None) -> SpoolFiles:
    """The logged rows read back from their segments into a spool file per table (made in
    ``work``), closed: the copy of batches that have none (a killed run's, or a failed copy's)."""
    files = SpoolFiles(work, prefix="log-")
    try:
        for segment, size in logged.segments.items():
            for _, _, lines in records(segment, size):
                for name, table_lines in zip(TABLE_NAMES, lines, strict=True):
                    if table_lines:
                        files.write(name, table_lines)
        files.close()
    except BaseException:
        files.discard()
        raise
    return files


def remove(logged: Logged) -> None:
    """Drop segments, and their copies, once their rows are committed to the tables."""
    for segment in logged.segments:
        os.remove(segment)
    logged.drop_copies()


def remove_if_empty(directory: str) -> None:
    """Remove a log's directory once every segment in it is inserted."""
    with contextlib.suppress(OSError):
        os.rmdir(directory)


class BatchLog:
    """``DATABASE.log/``: synced batches waiting to be inserted. The sink calls ``append`` (then
    ``add``) one batch at a time, never while it calls ``take``, all on its event loop."""

    def __init__(self, database: str, work: str | None = None) -> None:
        self._work = work
        """Where copies are made: the sink's spool directory."""
        if database == ":memory:":
            self.directory = tempfile.mkdtemp(prefix="clickflow-duckdb-log-")
        else:
            self.directory = log_directory(database)
            if not os.path.isdir(self.directory):
                os.mkdir(self.directory)
                logwriter.fsync_directory(os.path.dirname(os.path.abspath(self.directory)))
        self.pending = Logged()
        self.taken: Logged | None = None
        """Batches being inserted: until that ends, a new batch must not share their messages either."""
        existing = [int(name[: -len(SUFFIX)]) for name in os.listdir(self.directory) if name.endswith(SUFFIX)]
        self._sequence = max(existing, default=0)
        self._segment: str | None = None
        self._size = 0
        self._writer = LogWriter()

    def holding(self, messages: Iterable[str]) -> set[str]:
        """Which of ``messages`` the log holds: appended and synced, or being inserted, not yet committed."""
        held = self.pending.messages.intersection(messages)
        return held | self.taken.messages.intersection(messages) if self.taken is not None else held

    async def append(self, batch: LogBatch) -> None:
        """Make a batch durable in the current segment; then ``add``. After a failure the next
        batch starts a new segment: what the failed one left is past the last acknowledged byte."""
        segment = self._segment or await self._open_segment()
        try:
            size = await self._writer.append(batch.record())
        except OSError as exc:
            self._cut_back()
            raise OSError(exc.errno, f"cannot log a batch to {segment}: {exc.strerror}") from exc
        except BaseException:  # cancelled: the writer was stopped with the segment
            self._cut_back()
            raise
        self._size += size

    def add(self, batch: LogBatch) -> None:
        """Bookkeeping for a batch ``append`` made durable, and its copy."""
        assert self._segment is not None
        self.pending.add(self._segment, self._size, batch.counts(), batch.messages)
        self.pending.copy(batch, self._work)

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

    async def aclose(self) -> None:
        self._close_segment()
        await self._writer.aclose()

    async def _open_segment(self) -> str:
        self._sequence += 1
        segment = os.path.join(self.directory, f"{self._sequence:012d}{SUFFIX}")
        try:
            await self._writer.open(segment)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot start a log segment {segment}: {exc.strerror}") from exc
        self._segment, self._size = segment, 0
        return segment

    def _cut_back(self) -> None:
        """After a failed append (its writer stopped, or answered a failure and cut the segment back
        itself), the segment truncated to its acknowledged records, synced, and closed. A writer
        can die between syncing a record and answering for it: the batch is then given back and
        logged again, and were the whole record left, a killed run's segments would insert it twice."""
        assert self._segment is not None
        try:
            fd = os.open(self._segment, os.O_WRONLY)
            try:
                if os.fstat(fd).st_size > self._size:
                    os.ftruncate(fd, self._size)
                    os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            log.error("cannot cut %s back to its acknowledged records (%s): if this run is killed before its "
                      "next commit, a batch it logs again may be inserted twice", self._segment, exc)  # fmt: skip
        self._close_segment()

    def _close_segment(self) -> None:
        """Append no more to the segment; removed if no batch in it was acknowledged."""
        if self._segment is not None:
            if not self._size:
                with contextlib.suppress(OSError):
                    os.remove(self._segment)
            self._segment = None


_PIPE_ERRORS = (anyio.BrokenResourceError, anyio.ClosedResourceError, anyio.EndOfStream, anyio.IncompleteRead, OSError)
"""What a writer that died leaves its pipes raising (uvloop: EBADF once it has closed them)."""


class LogWriter:
    """The event loop's end of a ``logwriter`` process. Each request is sent whole and answered
    before the next. A request to a process that stopped fails on its pipes; the next request
    starts another, which has no segment open until it is told one (never started behind a
    segment's back)."""

    def __init__(self) -> None:
        self._process: Process | None = None
        self._replies: BufferedByteReceiveStream | None = None

    async def open(self, path: str) -> None:
        data = os.fsencode(path)
        await self._request([logwriter.request(logwriter.OPEN, len(data)) + data])

    async def append(self, record: list[bytes]) -> int:
        """Append a record's chunks; returns its size."""
        size = sum(map(len, record))
        await self._request(_pieces([logwriter.request(logwriter.APPEND, size), *record]))
        return size

    async def _request(self, pieces: Iterable[bytes]) -> None:
        if self._process is None:
            await self._start()
        assert self._process is not None and self._process.stdin is not None and self._replies is not None
        try:
            for piece in pieces:
                await self._process.stdin.send(piece)
            status = int.from_bytes(await self._replies.receive_exactly(8), "little")
        except _PIPE_ERRORS as exc:
            await self.aclose()  # started again for the next request
            raise OSError(errno.EIO, f"the log's writer process stopped ({describe(exc)})") from exc
        except BaseException:  # cancelled midway (the sink shields its writes): the pipe is out of step
            process, self._process, self._replies = self._process, None, None
            process.kill()
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):  # a hung disk must not hang a stop
                await process.wait()  # gone before its segment is cut back: no write of its lands after
            raise
        if status:
            raise OSError(status, os.strerror(status))

    async def _start(self) -> None:
        self._process = await anyio.open_process(
            [sys.executable, "-P", logwriter.__file__],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, start_new_session=True,
        )  # fmt: skip
        assert self._process.stdout is not None
        self._replies = BufferedByteReceiveStream(self._process.stdout)

    async def aclose(self) -> None:
        """End the process: it exits at the end of its input; one that does not is killed."""
        process, self._process, self._replies = self._process, None, None
        if process is None:
            return
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(10):
                await process.aclose()  # closes its input, then waits for it
            if process.returncode is None:
                process.kill()
                await process.wait()


def _pieces(chunks: list[bytes]) -> Iterator[bytes]:
    """``chunks`` joined into pieces of about ``logwriter.PIECE`` bytes: one send for a small
    record, and no second copy of a large one."""
    group: list[bytes] = []
    size = 0
    for chunk in chunks:
        group.append(chunk)
        size += len(chunk)
        if size >= logwriter.PIECE:
            yield b"".join(group)
            group, size = [], 0
    if group:
        yield b"".join(group)
