"""The DuckDB sink's tables: their SQL, making and checking them, and inserting spooled rows.

A batch's rows are inserted in one transaction with DuckDB's own JSON reader over the spool files
(see ``spool``), so per-row work stays out of Python. Re-delivered visits are dropped: a batch's
visits are counted against the table, and if some are there already, only the new ones (an
anti-join) are inserted, with their events and purchase items. A visit's rows always travel in the
same batch, so this is exact; ``dead_letter`` rows are anti-joined on their own key. There are no
primary-key indexes: DuckDB rewrites a whole index at every checkpoint, which made large tables
quadratically slow to load; the anti-joins scan numbers, ``visit_key`` and ``dead_letter_key``
(see ``KEYS``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from clickflow.schema import TABLES, Column, ColumnType, Table

if TYPE_CHECKING:
    import duckdb

log = logging.getLogger(__name__)

DUCKDB_TYPES: dict[ColumnType, str] = {
    "STRING": "VARCHAR",
    "INT64": "BIGINT",
    "FLOAT64": "DOUBLE",
    "TIMESTAMP": "TIMESTAMPTZ",
}


GENERATED = {("events", "event_id"): "visit_id || ':' || CAST(event_index AS VARCHAR)"}
"""Columns DuckDB computes instead of storing: the parser's ``event_id`` is ``visit_id:index``.
Not storing those unique strings makes loading events about a tenth cheaper."""


KEYS = {"visits": ("visit_key", "visit_id"), "dead_letter": ("dead_letter_key", "dead_letter_id")}
"""Columns only DuckDB's tables have, last in theirs: the visit's id (32 hex digits, see
``clickflow.parser.visit_id_for``; a dead letter's id is its visit's, or an event's
``visit_id:index``) as one 128-bit number, the key the de-duplication anti-joins read. The join
reads every stored key; as text, DuckDB decompressed and hashed each one: a small write at
10,000,000 stored visits took 4.6 times as long, and one with dead letters at 5,000,000 stored
dead letters four times (301 ms against 74, ``bench/bench_duckdb_growth.py``)."""

MATCHES = {
    "visits": "b.visit_key = t.visit_key",
    "dead_letter": "b.dead_letter_key = t.dead_letter_key AND b.event_index IS NOT DISTINCT FROM t.event_index",
}
"""A spooled row ``b`` that is a stored row ``t`` again: its key, and for a dead letter whether it
is a message's (no ``event_index``) or which event's."""


def key_value(table: str, id_sql: str, cast: str = "CAST") -> str:
    """SQL for ``table``'s key (``KEYS``) from an expression of its id's: the visit id, or a dead
    letter's visit id part, as a number (``TRY_CAST``: NULL, never matched, for an id that is not
    hex, which only another writer could have stored)."""
    if table == "dead_letter":
        id_sql = f"split_part({id_sql}, ':', 1)"
    return f"{cast}('0x' || {id_sql} AS UHUGEINT)"


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
    if table.name in KEYS:
        columns.append(f"{KEYS[table.name][0]} UHUGEINT")
    return f"CREATE TABLE IF NOT EXISTS {table.name} ({', '.join(columns)})"


def _written(table: Table) -> list[tuple[str, str]]:
    """The columns an insert writes, in order, each with its value's SQL from a spooled row ``j``:
    the schema's stored columns, then the table's key (``KEYS``), if it has one. ``insert_into`` and
    ``select_spooled`` both come from it, so their columns always line up."""
    written = []
    for i, column in _stored(table):
        if column.type == "TIMESTAMP":  # exact microseconds (no float), whatever the session's TimeZone
            written.append((column.name, f"make_timestamptz(j[{i}]::BIGINT)"))
        else:
            written.append((column.name, f"j[{i}]::{DUCKDB_TYPES[column.type]}"))
    if table.name in KEYS:
        key, id_column = KEYS[table.name]
        position = table.column_names.index(id_column) + 1
        cast = "CAST" if table.name == "visits" else "TRY_CAST"  # a dead letter is stored whatever it holds
        written.append((key, key_value(table.name, f"j[{position}]", cast)))
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


class MissingTables(Exception):
    """A database opened with ``create_tables: false`` lacks tables or columns clickflow writes."""


def lacking(con: duckdb.DuckDBPyConnection) -> str:
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
        for column in [c.name for c in table.columns] + ([KEYS[name][0]] if name in KEYS else [])
        if column not in found[name]
    ]
    parts = [f"table(s) {', '.join(tables)}"] if tables else []
    if columns:
        parts.append(f"column(s) {', '.join(columns)}")
    return "; ".join(parts)


def create_tables(con: duckdb.DuckDBPyConnection) -> None:
    """The four tables, made if missing, with the nullable columns clickflow has gained since."""
    for table in TABLES.values():
        con.execute(create_table_sql(table))
        for _, column in _stored(table):  # columns added since the file was made: nullable, added here
            if not column.required:
                con.execute(
                    f"ALTER TABLE {table.name} ADD COLUMN IF NOT EXISTS {column.name} {DUCKDB_TYPES[column.type]}"
                )
    # a file from before a key: its rows keyed once (an id that is not hex, which only another writer
    # could have stored, stays unkeyed and is never matched)
    for name, (key, id_column) in KEYS.items():
        con.execute(f"ALTER TABLE {name} ADD COLUMN IF NOT EXISTS {key} UHUGEINT")
        con.execute(f"UPDATE {name} SET {key} = {key_value(name, id_column, 'TRY_CAST')} WHERE {key} IS NULL")


def insert(
    con: duckdb.DuckDBPyConnection,
    paths: Mapping[str, str | Sequence[str]],
    counts: Mapping[str, int],
    in_parts: bool = False,
) -> int:
    """Insert spooled rows (``paths``: a file, a glob or a list of files per table) in one transaction, skipping rows
    already stored. ``counts`` are the rows in each table's files. Returns how many of the visits were stored
    already (with their rows, not inserted again).

    DuckDB holds much of a transaction's text in memory until it commits, and runs out of
    ``memory_limit`` when a batch is mostly long texts (page URLs a client made huge, the payloads
    of large malformed messages), whatever it could spill. Such a batch is inserted in parts
    instead, each a transaction of the visits whose id hashes to it, with all their rows (and the
    dead letters alike), ``FIRST_PARTS`` of them, a part halved again while it runs out. A visit's rows
    still commit together, and a part committed before a failure is found stored already by the
    next attempt. A checkpoint out of memory is fatal to the database: it must be opened again,
    and the batch is then inserted in parts from the first (``in_parts``)."""

    def spooled(name: str) -> str:
        return f"({select_spooled(TABLES[name], paths[name])}) b"

    import duckdb

    stored_already, parts = 0, [(1, 0)]
    if in_parts:
        log.warning("inserting a batch in %d parts: the last insert ran DuckDB's checkpoint out of its memory_limit",
                    FIRST_PARTS)  # fmt: skip
        parts = [(FIRST_PARTS, part) for part in reversed(range(FIRST_PARTS))]
    while parts:
        of, part = parts.pop()
        try:
            stored_already += _insert_part(con, spooled, counts, of, part)
        except Exception as exc:
            if of >= MAX_PARTS or not out_of_memory(exc) or isinstance(exc, duckdb.FatalException):
                raise
            if of == 1:
                log.warning("a batch's texts do not fit DuckDB's memory_limit at once; inserting it in %d parts (%s)",
                            FIRST_PARTS, str(exc).splitlines()[0])  # fmt: skip
                parts = [(FIRST_PARTS, part) for part in reversed(range(FIRST_PARTS))]
            else:
                parts += [(2 * of, part + of), (2 * of, part)]
    return stored_already


FIRST_PARTS = 16
"""The parts a batch that ran out of memory is inserted in. Halves were not enough: a half that
committed could still leave DuckDB's checkpoint after it (of everything committed since the last,
once past 16 MB) out of memory, which is fatal to the database. A batch's bytes are bounded (the
sink's ``batch.max_bytes``, 256MiB by default), so a sixteenth is at most 16 MiB."""
MAX_PARTS = 64
"""A part that still runs out is halved again, up to this many parts; an out-of-memory error that
parts do not cure (JSON's reader needs 32 MiB whatever it reads) is raised."""


_OUT_OF_MEMORY = ("Out of Memory", "failed to pin block", "could not allocate block")
"""What DuckDB says when it runs out of ``memory_limit``: at a commit, without the first."""


def out_of_memory(exc: BaseException) -> bool:
    """Whether DuckDB ran out of its ``memory_limit`` (at a commit its error is a TransactionException,
    so only its text says so)."""
    import duckdb

    text = str(exc)
    return isinstance(exc, duckdb.Error) and any(words in text for words in _OUT_OF_MEMORY)


def _insert_part(
    con: duckdb.DuckDBPyConnection, spooled: Callable[[str], str], counts: Mapping[str, int], of: int, part: int
) -> int:
    """One transaction: the spooled rows of the visits (and dead letters) whose id hashes to ``part``
    of ``of`` parts (all of them when ``of`` is 1). Returns the visits of the part stored already."""
    if of == 1:
        where = {"visits": "", "dead_letter": ""}
    else:
        where = {key: f" WHERE hash(b.{column}) % {of} = {part}" for key, column in (
            ("visits", "visit_id"), ("dead_letter", "dead_letter_id"))}  # fmt: skip
    con.begin()
    stored_already = 0
    try:
        if counts["visits"]:
            stored_already = _insert_visits(con, spooled, counts, where["visits"])
        if counts["dead_letter"]:
            con.execute(
                f"{insert_into(TABLES['dead_letter'])} SELECT b.* FROM {spooled('dead_letter')} "
                f"ANTI JOIN dead_letter t ON {MATCHES['dead_letter']}{where['dead_letter']}"
            )
        con.commit()
    except BaseException:
        import duckdb

        with contextlib.suppress(duckdb.Error):  # e.g. a failed commit has no transaction left to roll back
            con.rollback()
        raise
    return stored_already


def _insert_visits(
    con: duckdb.DuckDBPyConnection, spooled: Callable[[str], str], counts: Mapping[str, int], where: str
) -> int:
    """Visits not stored yet (of those ``where`` selects), with their events and purchase items;
    returns how many were."""
    visits = counts["visits"]
    if where:
        (visits,) = con.execute(f"SELECT count(*) FROM {spooled('visits')}{where}").fetchone() or (0,)
    con.execute(
        f"{insert_into(TABLES['visits'])} SELECT b.* FROM {spooled('visits')} "
        f"ANTI JOIN visits t ON {MATCHES['visits']}{where}"
    )
    (inserted,) = con.fetchone() or (0,)
    if inserted == 0:  # all delivered before, and so were their rows
        return int(visits)
    only_new = where
    if inserted < visits:  # some delivered before (rarely): undo, then keep the others' rows
        con.rollback()
        con.begin()
        con.execute(
            "CREATE OR REPLACE TEMP TABLE clickflow_new_visits AS "
            f"SELECT b.visit_id FROM {spooled('visits')} ANTI JOIN visits t ON {MATCHES['visits']}{where}"
        )
        only_new = " SEMI JOIN clickflow_new_visits n ON b.visit_id = n.visit_id"
        con.execute(f"{insert_into(TABLES['visits'])} SELECT b.* FROM {spooled('visits')}{only_new}")
    for name in ("events", "purchase_items"):
        if counts[name]:
            con.execute(f"{insert_into(TABLES[name])} SELECT b.* FROM {spooled(name)}{only_new}")
    if only_new != where:
        con.execute("DROP TABLE clickflow_new_visits")
    return int(visits - inserted)
