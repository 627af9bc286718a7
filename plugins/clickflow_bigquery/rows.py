"""Rows as BigQuery wants them: JSON objects, timestamps as strings, deterministic ids.

Timestamps are sent as RFC 3339 strings: BigQuery reads a JSON number in a
TIMESTAMP column as seconds, some emulators as microseconds; a string means the
same thing everywhere.
"""

from __future__ import annotations

import hashlib
import logging
import re
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import msgspec

from clickflow.rejections import REASON_TOO_LARGE
from clickflow.schema import DEAD_LETTER, TABLES, Table

log = logging.getLogger(__name__)

EPOCH = datetime(1970, 1, 1)
REASON_REJECTED = "bigquery_rejected"

_encode = msgspec.json.Encoder().encode
_encode_lines = msgspec.json.Encoder().encode_lines
_SECONDS: dict[int, str] = {}
_SECONDS_KEPT = 100_000


def timestamp(microseconds: int) -> str:
    """RFC 3339 in UTC, exact to the microsecond. A batch's times share few seconds (its ingestion
    time above all), so each second's text is made once."""
    seconds, fraction = divmod(microseconds, 1_000_000)
    text = _SECONDS.get(seconds)
    if text is None:
        if len(_SECONDS) >= _SECONDS_KEPT:
            _SECONDS.clear()
        text = _SECONDS[seconds] = (EPOCH + timedelta(seconds=seconds)).isoformat()
    return f"{text}.{fraction:06d}Z" if fraction else f"{text}Z"


class _Item(msgspec.Struct):
    """An insertAll request's row: its id, then the row."""

    insertId: str
    json: Any


def _row_struct(table: Table) -> type[msgspec.Struct]:
    """A struct with the table's columns as fields: built from a tuple in C, encoded as an object."""
    return msgspec.defstruct(f"{table.name}_row", [(name, Any) for name in table.column_names])


class RowEncoder:
    """Encodes a table's row tuples as the JSON objects BigQuery takes, many rows per C call."""

    def __init__(self, table: Table) -> None:
        self.struct = _row_struct(table)
        self.stamps = [i for i, c in enumerate(table.columns) if c.type == "TIMESTAMP"]
        self.key_of = row_id(table)

    def structs(self, rows: list[tuple[Any, ...]]) -> list[msgspec.Struct]:
        make, stamps = self.struct, self.stamps
        texts: dict[int | None, str | None] = {None: None}  # a batch repeats its times (ingestion above all)
        out = []
        for row in rows:
            values = list(row)
            for i in stamps:
                us = values[i]
                text = texts.get(us)
                if text is None and us is not None:
                    text = texts[us] = timestamp(us)
                values[i] = text
            out.append(make(*values))
        return out

    def lines(self, rows: list[tuple[Any, ...]]) -> bytes:
        """One JSON object per row, each ending in a newline (JSON text holds no raw newline)."""
        return _encode_lines(self.structs(rows))

    def request_rows(self, rows: list[tuple[Any, ...]]) -> bytes:
        """``{"insertId": key, "json": row}`` for each row, joined by commas: what an insertAll
        request's ``rows`` array holds, in one C call."""
        key_of = self.key_of
        return _encode([_Item(key_of(row), struct) for row, struct in zip(rows, self.structs(rows), strict=True)])[1:-1]

    def objects(self, rows: list[tuple[Any, ...]]) -> list[dict[str, Any]]:
        """The rows as dicts (Beam's ``WriteToBigQuery`` takes those)."""
        return [msgspec.structs.asdict(struct) for struct in self.structs(rows)]


def row_id(table: Table) -> Callable[[tuple[Any, ...]], str]:
    """The row's key as one string: its BigQuery ``insertId`` and the basis of load job ids."""
    positions = [table.index(column) for column in table.key]
    if len(positions) == 1:
        (only,) = positions
        return lambda row: str(row[only])
    return lambda row: ":".join(str(row[i]) for i in positions)


ROW_IDS = {name: row_id(table) for name, table in TABLES.items()}
ROW_ENCODERS = {name: RowEncoder(table) for name, table in TABLES.items()}


def encode_row(table: str, row: tuple[Any, ...]) -> bytes:
    """One row's JSON object (for the odd row made alone, such as a dead letter)."""
    return ROW_ENCODERS[table].lines([row])[:-1]


def object_row_id(table: str) -> Callable[[dict[str, Any]], str]:
    """The row's key, for a row as a JSON object (keys are never timestamps)."""
    names, row_id_of = TABLES[table].column_names, ROW_IDS[table]
    return lambda row: row_id_of(tuple(row.get(name) for name in names))


def json_row_id(table: str) -> Callable[[bytes], str]:
    """The same key, for a row already encoded as a JSON object."""
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
        "payload_bytes": None,  # a table's row, not a message: nothing to re-parse (README, "fixing dead letters")
        "parser_version": None,
        "replayed_at": None,
    }
    return tuple(values[name] for name in DEAD_LETTER.column_names)


KEPT_OF_TOO_LARGE = 64 * 1024
"""How much of a row too large for any request its dead letter keeps (less, if requests are small)."""


def too_large_row(table: str, key: str, row_json: bytes, max_request_bytes: int, sink: str) -> tuple[Any, ...]:
    """A ``too_large`` dead letter for a row longer than any request may be (a whole message of
    10 MB kept as a dead letter is 13 MB in base64): its head, size and SHA-256."""
    digest = hashlib.sha256(row_json).hexdigest()
    error = f"row of {len(row_json)} bytes is over max_request_bytes (sha256 {digest}); the payload is its head"
    log.warning("%s: %s row %s is too large for any request; sent to dead_letter", sink, table, key)
    kept = row_json[: min(KEPT_OF_TOO_LARGE, max_request_bytes // 4)]
    return rejected_row(table, key, kept, error, sink, time.time_ns() // 1000, REASON_TOO_LARGE)


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
