"""Rows as BigQuery wants them: JSON objects, timestamps as strings, deterministic ids.

Timestamps are sent as RFC 3339 strings: BigQuery reads a JSON number in a
TIMESTAMP column as seconds, some emulators as microseconds; a string means the
same thing everywhere.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from clickflow.schema import DEAD_LETTER, TABLES, Table

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
REASON_REJECTED = "bigquery_rejected"

_encode = msgspec.json.Encoder().encode


def timestamp(microseconds: int) -> str:
    return (EPOCH + timedelta(microseconds=microseconds)).isoformat()


def json_object(table: Table) -> Callable[[tuple[Any, ...]], dict[str, Any]]:
    """Turns one of the table's row tuples into the JSON object BigQuery takes."""
    names = table.column_names
    stamps = [i for i, c in enumerate(table.columns) if c.type == "TIMESTAMP"]

    def convert(row: tuple[Any, ...]) -> dict[str, Any]:
        values = list(row)
        for i in stamps:
            if values[i] is not None:
                values[i] = timestamp(values[i])
        return dict(zip(names, values, strict=True))

    return convert


def json_encoder(table: Table) -> Callable[[tuple[Any, ...]], bytes]:
    """Encodes one of the table's row tuples as a JSON object (bytes)."""
    convert = json_object(table)
    return lambda row: _encode(convert(row))


JSON_OBJECTS = {name: json_object(table) for name, table in TABLES.items()}
ENCODERS = {name: json_encoder(table) for name, table in TABLES.items()}


def row_id(table: Table) -> Callable[[tuple[Any, ...]], str]:
    """The row's key as one string: its BigQuery ``insertId`` and the basis of load job ids."""
    positions = [table.index(column) for column in table.key]
    if len(positions) == 1:
        (only,) = positions
        return lambda row: str(row[only])
    return lambda row: ":".join(str(row[i]) for i in positions)


ROW_IDS = {name: row_id(table) for name, table in TABLES.items()}


def object_row_id(table: str) -> Callable[[dict[str, Any]], str]:
    """The same id, for a row as a JSON object from ``JSON_OBJECTS`` (keys are never timestamps)."""
    names, row_id_of = TABLES[table].column_names, ROW_IDS[table]
    return lambda row: row_id_of(tuple(row.get(name) for name in names))


def json_row_id(table: str) -> Callable[[bytes], str]:
    """The same id, for a row already encoded by ``ENCODERS``."""
    of_object = object_row_id(table)
    return lambda line: of_object(msgspec.json.decode(line))


def rejected_row(
    table: str, key: str, row_json: bytes, error: str, sink: str, now: int, reason: str = REASON_REJECTED
) -> tuple[Any, ...]:
    """A ``dead_letter`` row for a row BigQuery refused (or could not take); its id names the table and the row."""
    values = {
        "dead_letter_id": f"{table}/{key}",  # never collides with the parser's: visit id [":" index]
        "received_at": now,
        "source": sink,
        "message_id": key,
        "event_index": int(key.split(":")[1]) if table in ("events", "purchase_items") else None,
        "reason": reason,
        "error": f"{table}: {error}",
        "payload": row_json.decode(errors="ignore"),  # a cut row may end inside a character
        "payload_encoding": "utf-8",
    }
    return tuple(values[name] for name in DEAD_LETTER.column_names)


_POSITION = re.compile(r"row starting at position (\d+)")
_LINE = re.compile(r"\bline (\d+)\b")


def error_locations(errors: list[dict[str, Any]]) -> tuple[set[int], set[int]]:
    """Byte offsets (BigQuery: "row starting at position N") and 1-based line numbers
    (emulators: "in line N") of the rows a failed load job names."""
    offsets: set[int] = set()
    lines: set[int] = set()
    for error in errors:
        message = str(error.get("message", ""))
        positions = _POSITION.findall(message)
        offsets.update(map(int, positions))
        if not positions:
            lines.update(map(int, _LINE.findall(message)))
    return offsets, lines
