"""The DuckDB sink's dead letters for ``clickflow dlq``: read, re-stored without duplicates, marked.

Functions of a connection, run in a worker thread by ``DuckDBSink``'s ``DeadLetterStore`` methods.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any

from clickflow.api import RowBatch
from clickflow.dlq import DeadLetterGroup, DeadLetterQuery, StoredDeadLetter
from clickflow.parser import VisitContext
from clickflow.schema import TABLES
from clickflow_duckdb.spool import JsonSpool
from clickflow_duckdb.tables import MATCHES, insert_into, select_spooled

if TYPE_CHECKING:
    import duckdb

_MATCHING = """replayed_at IS NULL AND (len($reasons) = 0 OR list_contains($reasons, reason))
    AND received_at >= make_timestamptz($since)"""
_ALL_TIME = -(2**62)

KEY_MATCH = {
    **MATCHES,  # visits and dead letters by DuckDB's own keys
    "events": "b.visit_id = t.visit_id AND b.event_index = t.event_index",  # event_id is computed from them
    "purchase_items": "b.event_id = t.event_id AND b.item_index = t.item_index",
}
"""How a row matches a stored one: its table's key (``clickflow.schema``)."""


def _parameters(query: DeadLetterQuery) -> dict[str, Any]:
    since = query.since_us if query.since_us is not None else _ALL_TIME
    return {"reasons": list(query.reasons), "since": since}


def groups(con: duckdb.DuckDBPyConnection, query: DeadLetterQuery) -> list[DeadLetterGroup]:
    con.execute(
        f"""SELECT reason, source, count(*) AS n, epoch_us(min(received_at)), epoch_us(max(received_at)),
                   any_value(message_id), any_value(error)
            FROM dead_letter WHERE {_MATCHING} GROUP BY reason, source ORDER BY n DESC, reason, source""",
        _parameters(query),
    )
    return [DeadLetterGroup(*row) for row in con.fetchall()]


def letters(con: duckdb.DuckDBPyConnection, query: DeadLetterQuery) -> list[StoredDeadLetter]:
    con.execute(
        f"""SELECT dead_letter_id, epoch_us(received_at), source, message_id, event_index, reason, payload,
                   payload_encoding, payload_bytes
            FROM dead_letter WHERE {_MATCHING} ORDER BY received_at, dead_letter_id""",
        _parameters(query),
    )
    return [StoredDeadLetter.from_stored(*row) for row in con.fetchall()]


def visit_contexts(con: duckdb.DuckDBPyConnection, visit_ids: list[str]) -> dict[str, VisitContext]:
    con.execute(
        "SELECT visit_id, session_id, user_id, device_type FROM visits WHERE visit_id IN (SELECT unnest($ids))",
        {"ids": visit_ids},
    )
    return {visit_id: VisitContext(*rest) for visit_id, *rest in con.fetchall()}


def store_new(con: duckdb.DuckDBPyConnection, rows: RowBatch, spool_root: str) -> None:
    """Insert the rows whose keys are not stored yet, all tables in one transaction."""
    import duckdb

    spool = JsonSpool(spool_root)
    try:
        spool.add(rows)
        spool.close()
        con.begin()
        try:
            for name, count in spool.counts().items():
                if count:
                    table = TABLES[name]
                    source = f"({select_spooled(table, spool.paths[name])}) b"
                    match = KEY_MATCH[name]
                    con.execute(f"{insert_into(table)} SELECT b.* FROM {source} ANTI JOIN {name} t ON {match}")
            con.commit()
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                con.rollback()
            raise
    finally:
        spool.discard()


def mark(con: duckdb.DuckDBPyConnection, dead_letter_ids: list[str], at_us: int) -> None:
    con.execute(
        "UPDATE dead_letter SET replayed_at = make_timestamptz($at) WHERE dead_letter_id IN (SELECT unnest($ids))",
        {"at": at_us, "ids": dead_letter_ids},
    )
