"""The DuckDB sink's dead letters for ``clickflow dlq``: read, re-stored without duplicates, marked.

Functions of a connection, run in a worker thread by ``DuckDBSink``'s ``DeadLetterStore`` methods.
"""

from __future__ import annotations

import contextlib
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from clickflow.api import RowBatch
from clickflow.dlq import PAGE_BYTES, PAGE_ROWS, DeadLetterGroup, DeadLetterQuery, StoredDeadLetter
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


def _until(query: DeadLetterQuery) -> int:
    return query.until_us if query.until_us is not None else -_ALL_TIME


def groups(con: duckdb.DuckDBPyConnection, query: DeadLetterQuery) -> list[DeadLetterGroup]:
    con.execute(
        f"""SELECT reason, source, count(*) AS n, epoch_us(min(received_at)), epoch_us(max(received_at)),
                   any_value(message_id), any_value(error)
            FROM dead_letter WHERE {_MATCHING} GROUP BY reason, source ORDER BY n DESC, reason, source""",
        _parameters(query),
    )
    return [DeadLetterGroup(*row) for row in con.fetchall()]


Key = tuple[int, str]
"""Where a dead letter comes in the order pages are read: its receive time (µs) and its id (unique
in DuckDB's table: redeliveries are stored once)."""

_AFTER = (  # its first term lets DuckDB skip the row groups read before, by their least and greatest times
    "received_at >= make_timestamptz($at) AND (received_at > make_timestamptz($at) OR dead_letter_id > $id)"
)
_UP_TO = "(received_at < make_timestamptz($to) OR (received_at = make_timestamptz($to) AND dead_letter_id <= $to_id))"


def page(con: duckdb.DuckDBPyConnection, query: DeadLetterQuery, after: Key | None) -> list[StoredDeadLetter]:
    """The next page of dead letters after ``after`` (from the first if None), oldest first: the
    next ``PAGE_ROWS`` keys (DuckDB keeps only those while it scans), cut where their payloads
    reach ``PAGE_BYTES``, then their payloads. Sorting the dead letters whole, with their payloads,
    ran out of ``memory_limit``."""
    where = f"{_MATCHING} AND received_at < make_timestamptz($until)" + (f" AND {_AFTER}" if after else "")
    parameters = {**_parameters(query), "until": _until(query), **({"at": after[0], "id": after[1]} if after else {})}
    con.execute(
        f"SELECT epoch_us(received_at), dead_letter_id FROM dead_letter WHERE {where} ORDER BY 1, 2 LIMIT {PAGE_ROWS}",
        parameters,
    )
    keys: list[Key] = con.fetchall()
    if not keys:
        return []
    parameters |= {"to": keys[-1][0], "to_id": keys[-1][1]}
    con.execute(
        f"SELECT epoch_us(received_at), dead_letter_id, strlen(payload) FROM dead_letter WHERE {where} AND {_UP_TO}",
        parameters,
    )
    sizes = sorted(con.fetchall())
    totals = accumulate(size or 0 for *_, size in sizes)
    last = next((i for i, total in enumerate(totals) if total >= PAGE_BYTES), len(sizes) - 1)
    parameters |= {"to": sizes[last][0], "to_id": sizes[last][1]}
    con.execute(
        f"""SELECT dead_letter_id, epoch_us(received_at), source, message_id, event_index, reason, payload,
                   payload_encoding, payload_bytes
            FROM dead_letter WHERE {where} AND {_UP_TO}""",
        parameters,
    )
    letters = [StoredDeadLetter.from_stored(*row) for row in con.fetchall()]
    return sorted(letters, key=lambda letter: (letter.received_at_us, letter.dead_letter_id))


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
