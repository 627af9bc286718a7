"""The ``duckdb`` sink: the embedded default, no cloud account needed.

A batch is gathered as JSON files (see ``spool``) and written in one
transaction with DuckDB's own JSON reader, so per-row work stays out of Python.
Batches are large by default: DuckDB writes a transaction of more than one row
group (122,880 rows) straight to the database file instead of through its
write-ahead log, which makes commits several times cheaper.

Re-delivered visits are dropped by an anti-join as they are inserted (see ``tables``).

With ``commit_every``, a batch is acknowledged once a child process has fsynced it into a log
beside the database, and the log is inserted in one transaction that often (see ``log``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any, Self, TypeVar

import anyio
import msgspec
from msgspec import Meta

from clickflow.api import AnySink, RowBatch, Sink, SinkContext
from clickflow.dlq import DeadLetterGroup, DeadLetterPage, DeadLetterQuery
from clickflow.hookspecs import Register, hookimpl
from clickflow.logs import describe
from clickflow.options import BatchLimits, ByteSize, Duration, SinkOptions
from clickflow.parser import VisitContext
from clickflow_duckdb import deadletters
from clickflow_duckdb.log import BatchLog, LogBatch, Logged, left_behind, log_directory, remove, remove_if_empty, split
from clickflow_duckdb.spool import JsonSpool, Spool
from clickflow_duckdb.tables import MissingTables, create_tables, insert, lacking, out_of_memory

if TYPE_CHECKING:
    import duckdb  # imported where a connection is made: 0.2 s that `clickflow validate` need not pay

log = logging.getLogger(__name__)
T = TypeVar("T")


DEFAULT_MEMORY_LIMIT = "128MB"


class DuckDBSinkOptions(SinkOptions, kw_only=True):
    path: str = "clickflow.duckdb"
    """Database file, created if missing."""
    memory_limit: str = DEFAULT_MEMORY_LIMIT
    """DuckDB's memory_limit (peak memory is about this plus 160MB)."""
    threads: Annotated[int, Meta(ge=1)] = 1
    """DuckDB worker threads; one leaves a core to the parser."""
    settings: dict[str, str | int | float | bool] = msgspec.field(default_factory=dict)
    """Any other DuckDB settings, e.g. {max_vacuum_tasks: 100}; applied last."""
    create_tables: bool = True
    """Create the four tables when opening, and add the nullable columns clickflow has gained
    since a table was made; else a missing table or column stops the sink from opening."""
    commit_every: Duration | None = None
    """Acknowledge each batch once it is fsynced to a log beside the database, and insert the log
    into the tables this often, in one transaction: for many small batches (the push endpoint).
    Rows reach queries up to this late; a killed run's log is inserted when the database is next opened."""
    batch: BatchLimits = BatchLimits(max_rows=300_000, max_bytes=ByteSize(256 << 20), max_age=Duration(seconds=5))

    def __post_init__(self) -> None:
        if not self.path.strip():  # DuckDB would take it for a database in memory, lost at the end
            raise ValueError("path is empty (an unset variable?); write :memory: for a database that is not kept")
        if self.commit_every is not None and self.commit_every <= timedelta(0):
            raise ValueError("commit_every must be longer than 0; leave it out to commit each batch as it is written")
        if self.memory_limit != DEFAULT_MEMORY_LIMIT or self.settings:  # else `validate` need not import DuckDB
            _check_config(self)

    def exclusive_resources(self) -> list[str]:
        """Two sinks on one file would each store every row: a file belongs to one sink."""
        return [] if self.path == ":memory:" else [f"DuckDB database {os.path.abspath(self.path)}"]

    def existing_only(self) -> Self:
        return msgspec.structs.replace(self, create_tables=False)

    def answering_hint(self) -> str | None:
        if self.commit_every is not None:
            return None
        return (
            "without commit_every each write is a DuckDB transaction (milliseconds, whatever its size), which holds "
            "it to about a fifth of the rate it reaches with commit_every: 1s (each batch acknowledged once logged, "
            "the log inserted every second)"
        )

    def nothing_stored(self) -> str | None:
        if self.path == ":memory:" or os.path.exists(self.path):
            return None
        return f"its database {os.path.abspath(self.path)} does not exist"


def _check_config(options: DuckDBSinkOptions) -> None:
    """Refuse what DuckDB would refuse when the sink opens (a size it cannot read, a setting it does
    not know), by opening a database in memory with the sink's configuration."""
    import duckdb

    try:
        duckdb.connect(":memory:", config=_config(options)).close()
    except duckdb.Error as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"memory_limit or settings: DuckDB refuses them: {why}") from None


LAST_COMMIT_ATTEMPTS = 3
"""Tries of a run's last commit, each after DuckDB's last fatal error (any other failure is final)."""


class DuckDBSink(Sink[DuckDBSinkOptions, Spool]):
    """Writes the four tables into a local DuckDB file, idempotently."""

    type_name = "duckdb"
    beam = "clickflow_duckdb.beam:WriteDuckDB"

    _connection: duckdb.DuckDBPyConnection | None = None
    _spool_root: str | None = None
    _log: BatchLog | None = None
    _context: SinkContext | None = None
    """The runtime's, from ``lifespan``: writes made outside one (``clickflow dlq replay``) have none."""
    _invalidated = False
    """DuckDB raised a fatal error: the connection is opened again before the next work (``_reopen``)."""
    _in_parts = False
    """The last insert's checkpoint ran out of memory, fatally: the next is made in parts from the first."""

    async def open(self) -> None:
        self._connection = await anyio.to_thread.run_sync(connect, self.options)
        self._spool_root = spool_directory(self.options.path)
        await self._in_thread(insert_left_behind, self.options.path, self._spool_root)
        if self.options.commit_every is not None:
            self._log = BatchLog(self.options.path, self._spool_root)
        self._committing = anyio.Lock()
        self._appending = anyio.Lock()
        """Held while a batch is appended to the log, and while a commit takes the log's batches."""

    def new_batch(self) -> Spool:
        if self._log is not None:
            return LogBatch(self._log)
        assert self._spool_root is not None, "open() first"
        return JsonSpool(self._spool_root)

    async def write(self, batch: Spool) -> None:
        batch.close()
        if self._log is None:
            assert isinstance(batch, JsonSpool)
            stored_already = await self._in_thread(insert, batch.paths, batch.counts(), self._in_parts)
            self._found_stored(batch.repeated_visits + stored_already)
            return
        assert isinstance(batch, LogBatch)
        if len(batch):  # else only messages the log holds: stored already
            with anyio.CancelScope(shield=True):  # a batch in the log is in the bookkeeping too
                if self._log.holding(batch.messages):  # logged while it gathered: once the tables hold it, anti-joined
                    await self.commit()
                async with self._appending:
                    await self._log.append(batch)
                    self._log.add(batch)
        self._found_stored(batch.repeated_visits)  # once written: a failed write is written again

    @asynccontextmanager
    async def lifespan(self, context: SinkContext) -> AsyncIterator[None]:
        self._context = context
        every = self.options.commit_every
        if every is None:
            yield
            return
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._commit_every, every.total_seconds())
            yield
            tasks.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            await self._last_commit()

    async def _last_commit(self) -> None:
        """The run's last commit; after a fatal error (a checkpoint out of memory), tried again once
        the database is opened again, which finds the parts committed before it stored already."""
        assert self._log is not None
        for attempt in range(1, LAST_COMMIT_ATTEMPTS + 1):
            try:
                await self.commit()
                return
            except Exception as exc:
                if not self._invalidated or attempt == LAST_COMMIT_ATTEMPTS:
                    raise OSError(
                        f"cannot insert the batch log ({describe(exc)}); its batches stay in {self._log.directory}, "
                        "and are inserted when the sink next opens"
                    ) from exc
                log.warning("sink %s: the last commit failed (%s); trying again", self.name, describe(exc))

    async def _commit_every(self, seconds: float) -> None:
        failing_since: float | None = None
        while True:
            await anyio.sleep(seconds)
            try:
                with anyio.CancelScope(shield=True):
                    await self.commit()
                failing_since = None
            except Exception as exc:  # the batches stay logged: tried again, and on the next open
                now = anyio.current_time()
                failing_since = now if failing_since is None else failing_since
                if now - failing_since > self.options.retry.give_up_after.total_seconds():
                    raise
                log.warning("sink %s: cannot insert the batch log yet: %s", self.name, describe(exc))

    async def commit(self) -> None:
        """Insert the logged batches into the tables (with ``commit_every``)."""
        assert self._log is not None
        async with self._committing:
            async with self._appending:
                logged = self._log.take()
            try:
                stored_already = await self._in_thread(insert_logged, logged, self._spool_root, self._in_parts)
            except BaseException:
                self._log.give_back(logged)
                raise
            self._log.committed()
            self._found_stored(stored_already)

    def _found_stored(self, visits: int) -> None:
        """Visits a write found stored already (an input read again, a redelivery): their rows are
        not stored twice, and the runtime says how many (``SinkContext.stored_already``)."""
        if visits and self._context is not None:
            self._context.stored_already(visits)

    # clickflow.dlq.DeadLetterStore: `clickflow dlq list` and `replay`

    async def dead_letter_groups(self, query: DeadLetterQuery) -> list[DeadLetterGroup]:
        return await self._in_thread(deadletters.groups, query)

    async def dead_letters(self, query: DeadLetterQuery) -> AsyncIterator[DeadLetterPage]:
        after = None
        while letters := await self._in_thread(deadletters.page, query, after):
            yield DeadLetterPage(letters)
            after = letters[-1].received_at_us, letters[-1].dead_letter_id

    async def visit_contexts(self, visit_ids: list[str]) -> dict[str, VisitContext]:
        return await self._in_thread(deadletters.visit_contexts, visit_ids)

    async def store_replayed(self, rows: RowBatch) -> None:
        await self._in_thread(deadletters.store_new, rows, self._spool_root)

    async def mark_replayed(self, dead_letter_ids: list[str], at_us: int) -> None:
        await self._in_thread(deadletters.mark, dead_letter_ids, at_us)

    async def _in_thread(self, work: Callable[..., T], *args: Any) -> T:
        """``work(cursor, *args)`` in a worker thread, on a cursor of its own, closed after."""
        return await anyio.to_thread.run_sync(self._on_cursor, work, *args)

    def _on_cursor(self, work: Callable[..., T], *args: Any) -> T:
        import duckdb

        if self._invalidated:
            self._reopen()  # if it cannot yet, this work fails, and is retried as any failed write
        try:
            with self._cursor() as cursor:
                done = work(cursor, *args)
        except duckdb.FatalException as exc:
            log.warning("sink %s: DuckDB invalidated %s after a fatal error; it is opened again for the next write",
                        self.name, self.options.path)  # fmt: skip
            self._invalidated = True
            self._in_parts = out_of_memory(exc)
            raise
        self._in_parts = False
        return done

    def _reopen(self) -> None:
        """After a fatal error (a checkpoint out of memory or disk) DuckDB refuses every statement
        until the database is opened again; opened again, it reads back what was committed from its
        write-ahead log, so a write retried there stores nothing twice. The invalid connection is
        closed first: while it is open, connecting returns the same database."""
        assert self._connection is not None
        self._connection.close()
        self._connection = connect(self.options)
        self._invalidated = False

    def _cursor(self) -> duckdb.DuckDBPyConnection:
        assert self._connection is not None, "open() first"
        return self._connection.cursor()

    async def close(self) -> None:
        if self._connection is not None:
            await anyio.to_thread.run_sync(self._connection.close)
            if self._spool_root is not None:
                shutil.rmtree(self._spool_root, ignore_errors=True)
            if self._log is not None:
                await self._log.aclose()
                remove_if_empty(self._log.directory)
            self._connection = None


def _config(options: DuckDBSinkOptions) -> dict[str, str | bool | int | float | list[str]]:
    return {
        "memory_limit": options.memory_limit,
        "threads": options.threads,
        # Checkpoints would merge each batch's last, partly filled row group with others: a
        # quarter of DuckDB's time in a bulk load, to save a few row groups per million rows.
        "max_vacuum_tasks": 0,
        **options.settings,
    }


_MAKER = "a `clickflow run` with `create_tables` on, its default,"
"""What makes the tables, for a sink opened without ``create_tables`` (``clickflow dlq``'s, or a user's)."""


def connect(options: DuckDBSinkOptions) -> duckdb.DuckDBPyConnection:
    """The database, with the four tables created if missing (``create_tables``); else checked."""
    import duckdb

    if not options.create_tables and options.nothing_stored():
        raise MissingTables(f"{options.path} does not exist ({_MAKER} makes it)")
    con = duckdb.connect(options.path, config=_config(options))
    con.execute("SET enable_progress_bar = false")
    con.execute("SET preserve_insertion_order = false")  # lets inserts run in parallel
    if options.create_tables:
        create_tables(con)
        return con
    missing = lacking(con)
    if missing:
        con.close()
        raise MissingTables(f"{options.path} lacks {missing} ({_MAKER} adds them)")
    return con


def insert_logged(
    con: duckdb.DuckDBPyConnection, logged: Logged, work: str | None = None, in_parts: bool = False
) -> int:
    """Logged batches into the tables (``insert``), then out of the log, from their copies; batches
    without one are read back from the log into spool files made in ``work``. Returns how many
    visits the tables held already."""
    if not logged.segments:
        return 0
    if not logged.copied():  # a killed run's segments, or a batch whose copy could not be written
        logged.copies = [split(logged, work)]  # kept, if the insert fails, for the next commit
    stored_already = insert(con, logged.copy_paths(), logged.counts, in_parts)
    remove(logged)
    return stored_already


def insert_left_behind(con: duckdb.DuckDBPyConnection, database: str, work: str | None = None) -> None:
    """What a killed run logged, inserted by whatever opens the database next (a run with or
    without ``commit_every``, or Beam's load): it was acknowledged, so it must not wait."""
    insert_logged(con, left_behind(database), work)
    remove_if_empty(log_directory(database))


def load_files(options: DuckDBSinkOptions, paths: Mapping[str, str], counts: Mapping[str, int]) -> int:
    """``insert`` on a connection of its own (the Beam translation's last step); returns the visits
    found stored already."""
    with connect(options) as con:
        insert_left_behind(con, options.path)
        return insert(con, paths, counts)


def spool_directory(database: str) -> str:
    """An empty directory for batch files: ``DATABASE.spool`` beside a database file.

    Files a killed run left behind are removed here, when the next run opens the
    database (their batches were never acknowledged, so their sources send them again).
    """
    if database == ":memory:":
        return tempfile.mkdtemp(prefix="clickflow-duckdb-")
    directory = f"{database}.spool"
    shutil.rmtree(directory, ignore_errors=True)
    os.mkdir(directory)
    return directory


@hookimpl
def register_sinks(register: Register[AnySink]) -> None:
    register(DuckDBSink)
