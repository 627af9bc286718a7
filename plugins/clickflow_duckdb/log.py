"""The DuckDB sink's batch log, for ``commit_every``: durable at once, inserted together later.

A DuckDB transaction costs a few milliseconds per statement and per commit, whatever its size,
which bounds a stream of small batches (the push endpoint answers each request only once its
rows are stored). With a log, a batch's spool files are fsynced and their directory is renamed
into ``DATABASE.log/`` (atomic: a batch is in the log whole or not at all); the write returns and
the batch is acknowledged. Every ``commit_every`` the sink inserts all logged batches in one
transaction, then removes them. A run that is killed leaves its log, which is inserted when the
database is next opened, so an acknowledged batch is never lost.

Logged batches never share a message: a batch with a message already in the log is written
after the log is committed, so the insert's anti-join against the tables drops every repeat.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterable

from clickflow.schema import TABLE_NAMES
from clickflow_duckdb.spool import JsonSpool


class Logged:
    """Batches in the log: their directories, rows per table, and the messages they hold."""

    def __init__(self, directories: list[str] | None = None) -> None:
        self.directories = directories or []
        self.counts = dict.fromkeys(TABLE_NAMES, 0)
        self.messages: set[str] = set()

    def add(self, directories: list[str], counts: dict[str, int], messages: set[str]) -> None:
        self.directories += directories
        for name, count in counts.items():
            self.counts[name] += count
        self.messages |= messages

    def files(self) -> dict[str, list[str]]:
        """Each table's spool files across the batches (a table a batch has no rows for has none)."""
        return {
            name: [path for d in self.directories if os.path.exists(path := os.path.join(d, f"{name}.ndjson"))]
            for name in TABLE_NAMES
        }


def log_directory(database: str) -> str:
    return f"{database}.log"


def left_behind(database: str) -> Logged:
    """Batches a killed run logged but did not insert, with their rows counted from the files.
    Looked for whatever this run's ``commit_every``: they were acknowledged."""
    directory = log_directory(database)
    if database == ":memory:" or not os.path.isdir(directory):
        return Logged()
    entries = sorted(os.path.join(directory, name) for name in os.listdir(directory))
    logged = Logged(directories=[path for path in entries if os.path.isdir(path)])  # batches: whole directories
    for name, paths in logged.files().items():
        logged.counts[name] = sum(_lines(path) for path in paths)
    return logged


def remove_if_empty(directory: str) -> None:
    """Remove a log's directory once every batch in it is inserted."""
    with contextlib.suppress(OSError):
        os.rmdir(directory)


class BatchLog:
    """``DATABASE.log/``: fsynced batches waiting to be inserted. Not thread-safe: the sink
    calls ``persist`` in a thread and keeps the bookkeeping on its event loop."""

    def __init__(self, database: str) -> None:
        if database == ":memory:":
            self.directory = tempfile.mkdtemp(prefix="clickflow-duckdb-log-")
        else:
            self.directory = log_directory(database)
            os.makedirs(self.directory, exist_ok=True)
        self.pending = Logged()
        self.taken: Logged | None = None
        """Batches being inserted: until that ends, a new batch must not share their messages either."""
        self._sequence = 0

    def overlaps(self, batch: JsonSpool) -> bool:
        return any(not logged.messages.isdisjoint(batch.messages) for logged in (self.pending, self.taken) if logged)

    def persist(self, batch: JsonSpool) -> str:
        """Make a closed batch durable in the log (blocking: run it in a thread); returns its new
        directory, to be handed to ``add`` once this returns."""
        for path in batch.paths.values():
            if os.path.exists(path):
                _fsync(path, os.O_RDONLY)
        _fsync(batch.directory, os.O_RDONLY | os.O_DIRECTORY)
        self._sequence += 1
        logged = os.path.join(self.directory, f"{self._sequence:012d}-{os.path.basename(batch.directory)}")
        os.rename(batch.directory, logged)
        _fsync(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        return logged

    def add(self, directory: str, batch: JsonSpool) -> None:
        self.pending.add([directory], batch.counts(), batch.messages)

    def take(self) -> Logged:
        """The pending batches, to be inserted; then ``committed`` or ``give_back``."""
        self.taken, self.pending = self.pending, Logged()
        return self.taken

    def committed(self) -> None:
        self.taken = None

    def give_back(self, logged: Logged) -> None:
        """Batches that could not be inserted: pending again, with those logged since."""
        self.pending.add(logged.directories, logged.counts, logged.messages)
        self.taken = None

    @staticmethod
    def remove(directories: Iterable[str]) -> None:
        """Drop batches once their rows are committed to the tables."""
        for directory in directories:
            shutil.rmtree(directory)


def _fsync(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _lines(path: str) -> int:
    with open(path, "rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))
