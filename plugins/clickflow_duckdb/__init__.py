"""The ``duckdb`` sink: the embedded default, no cloud account needed.

A batch is gathered as JSON files (see ``spool``) and written in one
transaction with DuckDB's own JSON reader, so per-row work stays out of Python.
Batches are large by default: DuckDB writes a transaction of more than one row
group (122,880 rows) straight to the database file instead of through its
write-ahead log, which makes commits several times cheaper.

Re-delivered visits are dropped: a batch's visits are counted against the
table, and if some are there already, only the new ones (an anti-join) are
inserted, with their events and purchase items. A visit's rows always travel
in the same batch, so this is exact; ``dead_letter`` rows are anti-joined on
their own key. There are no primary-key indexes: DuckDB rewrites a whole index
at every checkpoint, which made large tables quadratically slow to load; the
count and the anti-join scan one column, ``visit_key``: the visit id as a number.

With ``commit_every``, a batch is acknowledged once a child process has fsynced it into a log
beside the database, and the log is inserted in one transaction that often (see ``log``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any, Self, TypeVar

import anyio
import msgspec
from msgspec import Meta

from clickflow.api import AnySink, RowBatch, Sink, SinkContext
from clickflow.dlq import DeadLetterGroup, DeadLetterPage, DeadLetterQuery
from clickflow.hookspecs import Register, hookimpl
from clickflow.options import BatchLimits, ByteSize, Duration, SinkOptions
from clickflow.parser import VisitContext
from clickflow.schema import TABLES, Column, ColumnType, Table, VisitCol
from clickflow_duckdb import deadletters
from clickflow_duckdb.log import BatchLog, LogBatch, Logged, left_behind, log_directory, remove, remove_if_empty, split
from clickflow_duckdb.spool import JsonSpool, Spool

if TYPE_CHECKING:
    import duckdb  # imported where a connection is made: 0.2 s that `clickflow validate` need not pay

log = logging.getLogger(__name__)
T = TypeVar("T")

DUCKDB_TYPES: dict[ColumnType, str] = {
    "STRING": "VARCHAR",
    "INT64": "BIGINT",
    "FLOAT64": "DOUBLE",
    "TIMESTAMP": "TIMESTAMPTZ",
}


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


GENERATED = {("events", "event_id"): "visit_id || ':' || CAST(event_index AS VARCHAR)"}
"""Columns DuckDB computes instead of storing: the parser's ``event_id`` is ``visit_id:index``.
Not storing those unique strings makes loading events about a tenth cheaper."""


VISIT_KEY = "visit_key"
"""A column only DuckDB's ``visits`` has, last: ``visit_id`` (32 hex digits, see
``clickflow.parser.visit_id_for``) as one 128-bit number, the key the de-duplication anti-join
reads. The join reads every stored key; as text, DuckDB decompressed and hashed each one: a small
write at 10,000,000 stored visits took 4.6 times as long (``bench/bench_duckdb_growth.py``)."""


def visit_key(visit_id: str, cast: str = "CAST") -> str:
    """SQL for ``VISIT_KEY``'s value from an expression of ``visit_id``'s."""
    return f"{cast}('0x' || {visit_id} AS UHUGEINT)"


def _stored(table: Table) -> list[tuple[int, Column]]:
    """The table's columns that are written, with their 1-based position in a spooled row."""
    return [(i, c) for i, c in enumerate(table.columns, 1) if (table.name, c.name) not in GENERATED]


def create_table_sql(table: Table) -> str:
    columns = []
    for column in table.columns:
        expression = GENERATED.get((table.name, column.name))
        if expression:
            columns.append(f"{column.name} {DUCKDB_TYPES[column.type]} GENERATED ALWAYS AS ({expression}) VIRTUAL")
        else:
            columns.append(f"{column.name} {DUCKDB_TYPES[column.type]}{' NOT NULL' if column.required else ''}")
    if table.name == "visits":
        columns.append(f"{VISIT_KEY} UHUGEINT")
    return f"CREATE TABLE IF NOT EXISTS {table.name} ({', '.join(columns)})"


def _written(table: Table) -> list[tuple[str, str]]:
    """The columns an insert writes, in order, each with its value's SQL from a spooled row ``j``:
    the schema's stored columns, then ``visits``' ``visit_key``. ``insert_into`` and
    ``select_spooled`` both come from it, so their columns always line up."""
    written = []
    for i, column in _stored(table):
        if column.type == "TIMESTAMP":  # exact microseconds (no float), whatever the session's TimeZone
            written.append((column.name, f"make_timestamptz(j[{i}]::BIGINT)"))
        else:
            written.append((column.name, f"j[{i}]::{DUCKDB_TYPES[column.type]}"))
    if table.name == "visits":
        written.append((VISIT_KEY, visit_key(f"j[{VisitCol.visit_id + 1}]")))
    return written


def insert_into(table: Table) -> str:
    """``INSERT INTO table (written columns)``, to be followed by ``select_spooled``."""
    return f"INSERT INTO {table.name} ({', '.join(name for name, _ in _written(table))})"


def select_spooled(table: Table, paths: str | Sequence[str]) -> str:
    """A SELECT that reads spool files (rows as JSON arrays) as the table's written columns."""
    columns = [f"{value} AS {name}" for name, value in _written(table)]
    files = _sql_text(paths) if isinstance(paths, str) else f"[{', '.join(map(_sql_text, paths))}]"
    source = f"read_json({files}, format='newline_delimited', records=false, columns={{'j': 'VARCHAR[]'}})"
    return f"SELECT {', '.join(columns)} FROM {source}"


def _sql_text(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


class DuckDBSink(Sink[DuckDBSinkOptions, Spool]):
    """Writes the four tables into a local DuckDB file, idempotently."""

    type_name = "duckdb"
    beam = "clickflow_duckdb.beam:WriteDuckDB"

    _connection: duckdb.DuckDBPyConnection | None = None
    _spool_root: str | None = None
    _log: BatchLog | None = None

    async def open(self) -> None:
        self._connection = await anyio.to_thread.run_sync(connect, self.options)
        try:
            self._spool_root = spool_directory(self.options.path)
            await self._in_thread(insert_left_behind, self.options.path, self._spool_root)
            if self.options.commit_every is not None:
                self._log = BatchLog(self.options.path, self._spool_root)
        except BaseException:  # e.g. a damaged log: the database is let go, for the operator
            with anyio.CancelScope(shield=True):
                await self.close()
            raise
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
            await self._in_thread(insert, batch.paths, batch.counts())
            return
        assert isinstance(batch, LogBatch)
        if not len(batch):  # only messages the log holds: stored already
            return
        with anyio.CancelScope(shield=True):  # a batch in the log is in the bookkeeping too
            if self._log.holding(batch.messages):  # logged while it gathered: once the tables hold it, anti-joined
                await self.commit()
            async with self._appending:
                await self._log.append(batch)
                self._log.add(batch)

    @asynccontextmanager
    async def lifespan(self, context: SinkContext) -> AsyncIterator[None]:
        every = self.options.commit_every
        if every is None:
            yield
            return
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(self._commit_every, every.total_seconds())
            yield
            tasks.cancel_scope.cancel()
        with anyio.CancelScope(shield=True):
            try:
                await self.commit()
            except Exception as exc:
                assert self._log is not None
                raise OSError(
                    f"cannot insert the batch log ({exc}); its batches stay in {self._log.directory}, "
                    "and are inserted when the sink next opens"
                ) from exc

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
                log.warning("sink %s: cannot insert the batch log yet: %s", self.name, exc)

    async def commit(self) -> None:
        """Insert the logged batches into the tables (with ``commit_every``)."""
        assert self._log is not None
        async with self._committing:
            async with self._appending:
                logged = self._log.take()
            try:
                await self._in_thread(insert_logged, logged, self._spool_root)
            except BaseException:
                self._log.give_back(logged)
                raise
            self._log.committed()

    # clickflow.dlq.DeadLetterStore: `clickflow dlq list` and `replay`

    async def dead_letter_groups(self, query: DeadLetterQuery) -> list[DeadLetterGroup]:
        return await self._in_thread(deadletters.groups, query)

    async def dead_letters(self, query: DeadLetterQuery) -> DeadLetterPage:
        return DeadLetterPage(await self._in_thread(deadletters.letters, query))

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
        with self._cursor() as cursor:
            return work(cursor, *args)

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


def connect(options: DuckDBSinkOptions) -> duckdb.DuckDBPyConnection:
    """The database, with the four tables created if missing (``create_tables``); else checked."""
    import duckdb

    if not options.create_tables and options.nothing_stored():
        raise MissingTables(f"{options.path} does not exist (a `clickflow run` of the pipeline makes it)")
    con = duckdb.connect(options.path, config=_config(options))
    con.execute("SET enable_progress_bar = false")
    con.execute("SET preserve_insertion_order = false")  # lets inserts run in parallel
    if options.create_tables:
        _create_tables(con)
        return con
    lacking = _lacking(con)
    if lacking:
        con.close()
        raise MissingTables(f"{options.path} lacks {lacking} (a `clickflow run` of the pipeline adds them)")
    return con


class MissingTables(Exception):
    """A database opened with ``create_tables: false`` lacks tables or columns clickflow writes."""


def _lacking(con: duckdb.DuckDBPyConnection) -> str:
    """The tables, and the columns of those there, that clickflow writes and the database lacks."""
    found: dict[str, set[str]] = {}
    for table, column in con.execute(
        "SELECT table_name, column_name FROM duckdb_columns() "
        "WHERE database_name = current_database() AND schema_name = current_schema()"
    ).fetchall():
        found.setdefault(table, set()).add(column)
    tables = [name for name in TABLES if name not in found]
    columns = [
        f"{name}.{column}"
        for name, table in TABLES.items()
        if name in found
        for column in [c.name for c in table.columns] + ([VISIT_KEY] if name == "visits" else [])
        if column not in found[name]
    ]
    parts = [f"table(s) {', '.join(tables)}"] if tables else []
    if columns:
        parts.append(f"column(s) {', '.join(columns)}")
    return "; ".join(parts)


def _create_tables(con: duckdb.DuckDBPyConnection) -> None:
    for table in TABLES.values():
        con.execute(create_table_sql(table))
        for _, column in _stored(table):  # columns added since the file was made: nullable, added here
            if not column.required:
                con.execute(
                    f"ALTER TABLE {table.name} ADD COLUMN IF NOT EXISTS {column.name} {DUCKDB_TYPES[column.type]}"
                )
    # a file from before visit_key: its visits keyed once (an id that is not hex, which only another
    # writer could have stored, stays unkeyed and is never matched)
    con.execute(f"ALTER TABLE visits ADD COLUMN IF NOT EXISTS {VISIT_KEY} UHUGEINT")
    con.execute(f"UPDATE visits SET {VISIT_KEY} = {visit_key('visit_id', 'TRY_CAST')} WHERE {VISIT_KEY} IS NULL")


def insert(con: duckdb.DuckDBPyConnection, paths: Mapping[str, str | Sequence[str]], counts: Mapping[str, int]) -> None:
    """Insert spooled rows (``paths``: a file, a glob or a list of files per table) in one transaction, skipping rows
    already stored. ``counts`` are the rows in each table's files."""

    def spooled(name: str) -> str:
        return f"({select_spooled(TABLES[name], paths[name])}) b"

    con.begin()
    try:
        if counts["visits"]:
            _insert_visits(con, spooled, counts)
        if counts["dead_letter"]:
            con.execute(
                f"{insert_into(TABLES['dead_letter'])} SELECT b.* FROM {spooled('dead_letter')} "
                "ANTI JOIN dead_letter t ON b.dead_letter_id = t.dead_letter_id"
            )
        con.commit()
    except BaseException:
        import duckdb

        with contextlib.suppress(duckdb.Error):  # e.g. a failed commit has no transaction left to roll back
            con.rollback()
        raise


def _insert_visits(con: duckdb.DuckDBPyConnection, spooled: Callable[[str], str], counts: Mapping[str, int]) -> None:
    """Visits not stored yet, with their events and purchase items."""
    con.execute(
        f"{insert_into(TABLES['visits'])} SELECT b.* FROM {spooled('visits')} "
        "ANTI JOIN visits t ON b.visit_key = t.visit_key"
    )
    (inserted,) = con.fetchone() or (0,)
    if inserted == 0:  # all delivered before, and so were their rows
        return
    only_new = ""
    if inserted < counts["visits"]:  # some delivered before (rarely): undo, then keep the others' rows
        con.rollback()
        con.begin()
        con.execute(
            "CREATE OR REPLACE TEMP TABLE clickflow_new_visits AS "
            f"SELECT b.visit_id FROM {spooled('visits')} ANTI JOIN visits t ON b.visit_key = t.visit_key"
        )
        only_new = " SEMI JOIN clickflow_new_visits n ON b.visit_id = n.visit_id"
        con.execute(f"{insert_into(TABLES['visits'])} SELECT b.* FROM {spooled('visits')}{only_new}")
    for name in ("events", "purchase_items"):
        if counts[name]:
            con.execute(f"{insert_into(TABLES[name])} SELECT b.* FROM {spooled(name)}{only_new}")
    if only_new:
        con.execute("DROP TABLE clickflow_new_visits")


def insert_logged(con: duckdb.DuckDBPyConnection, logged: Logged, work: str | None = None) -> None:
    """Logged batches into the tables, then out of the log: from their copies, or else from a spool
    file per table read back from the log, in a directory made in ``work``."""
    if logged.segments:
        copied = logged.copied()
        if copied is not None:
            insert(con, copied, logged.counts)
        else:
            with tempfile.TemporaryDirectory(prefix="log-", dir=work) as directory:
                insert(con, split(logged, directory), logged.counts)
        remove(logged)


def insert_left_behind(con: duckdb.DuckDBPyConnection, database: str, work: str | None = None) -> None:
    """What a killed run logged, inserted by whatever opens the database next (a run with or
    without ``commit_every``, or Beam's load): it was acknowledged, so it must not wait."""
    insert_logged(con, left_behind(database), work)
    remove_if_empty(log_directory(database))


def load_files(options: DuckDBSinkOptions, paths: Mapping[str, str], counts: Mapping[str, int]) -> None:
    """``insert`` on a connection of its own (the Beam translation's last step)."""
    with connect(options) as con:
        insert_left_behind(con, options.path)
        insert(con, paths, counts)


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
