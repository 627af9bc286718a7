"""The ``bigquery_streaming`` sink: ``tabledata.insertAll``, split within the API's limits.

Every row is sent with its key as ``insertId``, so BigQuery drops a row it saw
in the last minutes: a Pub/Sub redelivery, or a request retried after a lost
answer. A 2xx answer can still list ``insertErrors``: rows BigQuery calls
``invalid`` become ``dead_letter`` rows carrying its message; rows that failed
for another reason (``stopped`` by an invalid neighbour, ``timeout``,
``backendError``) are sent again. A batch remembers which rows are confirmed,
so when a request fails (429, 5xx, network) and the runtime retries the batch
with backoff, only the unconfirmed rows go out again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated

import anyio
import msgspec
from msgspec import Meta

from clickflow.api import RowBatch
from clickflow.options import BatchLimits, ByteSize, Duration, PositiveInt, check_range
from clickflow.schema import TABLE_NAMES, DeadLetterCol
from clickflow_bigquery.common import BigQueryOptions, BigQuerySink
from clickflow_bigquery.rows import ROW_ENCODERS, encode_row, rejected_row, too_large_row

log = logging.getLogger(__name__)

MAX_ROUNDS = 5
"""Rounds of requests within one write: retried rows and new dead letters need another."""

_encode_str = msgspec.json.Encoder().encode
_BODY_START = b'{"skipInvalidRows":true,"ignoreUnknownValues":false,"rows":['
_BODY_END = b"]}"
_JSON_FIELD = b',"json":'


class BigQueryStreamingOptions(BigQueryOptions, kw_only=True):
    max_rows_per_request: Annotated[int, Meta(ge=1, le=500)] = 500
    """BigQuery advises at most 500."""
    max_request_bytes: ByteSize = ByteSize(5 * 1024 * 1024)
    """The API's limit is 10 MB."""
    concurrency: PositiveInt = 8
    """insertAll requests in flight."""
    batch: BatchLimits = BatchLimits(max_rows=20_000, max_bytes=ByteSize(16 << 20), max_age=Duration(seconds=1))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("max_request_bytes", self.max_request_bytes, 64 * 1024, 9 * 1024 * 1024)


@dataclass(slots=True)
class EncodedRows:
    """Rows of one table as an insertAll request's ``rows`` array holds them: ``{"insertId": key,
    "json": row}`` objects joined by commas, encoded in one C call, never more rows than a request
    takes. Cut into single rows only where a row must be seen alone (BigQuery refused it, or it
    is too large for any request)."""

    count: int
    text: bytes

    def rows(self) -> list[EncodedRows]:
        """Each row alone. A JSON string holds no bare quote, and no column is an object, so
        ``,{"insertId":`` is only ever where a row starts."""
        if self.count == 1:
            return [self]
        first, *rest = self.text.split(_ROW_SEPARATOR)
        rows = [EncodedRows(1, first), *(EncodedRows(1, _ROW_START + row) for row in rest)]
        if len(rows) != self.count:  # a change in how rows are encoded: refuse it, never misplace rows
            raise RuntimeError(f"{self.count} encoded rows split into {len(rows)}")
        return rows

    @property
    def key(self) -> str:
        """A single row's key (its ``insertId``)."""
        return _decode_row(self.text).insertId

    @property
    def json(self) -> bytes:
        """A single row's JSON object, as encoded."""
        return bytes(_decode_row(self.text).json)


class _RawRow(msgspec.Struct):
    insertId: str
    json: msgspec.Raw


_decode_row = msgspec.json.Decoder(_RawRow).decode
_ROW_START = b'{"insertId":'
_ROW_SEPARATOR = b"," + _ROW_START


@dataclass
class InsertBatch:
    """Rows not yet confirmed by BigQuery, per table, encoded as they arrive."""

    max_item_bytes: int = 9 * 1024 * 1024
    """A row longer than this cannot go in any request: it becomes a ``too_large`` dead letter."""
    sink: str = "bigquery_streaming"
    max_rows: int = 500
    """The rows of one request at most (``max_rows_per_request``): encoded rows are cut to it."""
    pending: dict[str, list[EncodedRows]] = field(default_factory=lambda: {name: [] for name in TABLE_NAMES})
    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLE_NAMES, 0))

    def add(self, rows: RowBatch) -> None:
        limit, step = self.max_item_bytes, self.max_rows
        for name, table_rows in rows.tables.items():
            encode = ROW_ENCODERS[name].request_rows
            for start in range(0, len(table_rows), step):
                part = table_rows[start : start + step]
                encoded = EncodedRows(len(part), encode(part))
                if len(encoded.text) <= limit:  # then so is each of its rows
                    self.pending[name].append(encoded)
                    continue
                for row in encoded.rows():
                    if len(row.text) <= limit:
                        self.pending[name].append(row)
                    else:
                        self.pending["dead_letter"].append(self._too_large(name, row))

    def _too_large(self, table: str, row: EncodedRows) -> EncodedRows:
        dead = too_large_row(table, row.key, row.json, self.max_item_bytes, self.sink)
        return _encoded(dead[DeadLetterCol.dead_letter_id], encode_row("dead_letter", dead))

    def __len__(self) -> int:
        return sum(self.counts().values())

    def counts(self) -> dict[str, int]:
        return {
            name: self.written[name] + sum(rows.count for rows in pending) for name, pending in self.pending.items()
        }

    def discard(self) -> None:
        self.pending = {name: [] for name in TABLE_NAMES}


def _encoded(key: str, row_json: bytes) -> EncodedRows:
    return EncodedRows(1, _ROW_START + _encode_str(key) + _JSON_FIELD + row_json + b"}")


def requests(pending: list[EncodedRows], max_rows: int, max_bytes: int) -> Iterator[list[EncodedRows]]:
    """Consecutive runs of ``pending`` whose request bodies stay within both limits (each of
    ``pending`` within them alone: ``InsertBatch`` makes them so)."""
    chunk: list[EncodedRows] = []
    rows, size = 0, len(_BODY_START) + len(_BODY_END)
    for encoded in pending:
        encoded_size = len(encoded.text) + 1
        if chunk and (rows + encoded.count > max_rows or size + encoded_size > max_bytes):
            yield chunk
            chunk, rows, size = [], 0, len(_BODY_START) + len(_BODY_END)
        if size + encoded_size > max_bytes or encoded.count > max_rows:
            raise ValueError(
                f"{encoded.count} row(s) of {encoded_size} bytes alone are over a request's limits "
                f"(max_rows_per_request {max_rows}, max_request_bytes {max_bytes})"
            )
        chunk.append(encoded)
        rows += encoded.count
        size += encoded_size
    if chunk:
        yield chunk


def request_body(chunk: list[EncodedRows]) -> bytes:
    return _BODY_START + b",".join(encoded.text for encoded in chunk) + _BODY_END


RETRIED_REASONS = frozenset({"stopped", "timeout", "backendError", "internalError", "rateLimitExceeded"})


@dataclass
class Outcome:
    """What one request settled: rows confirmed, rows to send again, rows refused (with why)."""

    confirmed: int = 0
    again: list[EncodedRows] = field(default_factory=list)
    refused: list[tuple[EncodedRows, str]] = field(default_factory=list)


def settle(chunk: list[EncodedRows], answer: dict[str, object]) -> Outcome:
    """Sort a request's rows by the ``insertErrors`` of its 2xx answer (each row named by its
    index in the request, so only then are they taken one by one)."""
    errors: dict[int, list[dict[str, str]]] = {
        int(e["index"]): e.get("errors", [])
        for e in answer.get("insertErrors", []) or []  # type: ignore[attr-defined]
    }
    if not errors:
        return Outcome(confirmed=sum(encoded.count for encoded in chunk))
    outcome = Outcome()
    for index, row in enumerate(row for encoded in chunk for row in encoded.rows()):
        row_errors = errors.get(index)
        if row_errors is None:
            outcome.confirmed += 1
        elif all(e.get("reason") in RETRIED_REASONS for e in row_errors):
            outcome.again.append(row)
        else:
            messages = "; ".join(f"{e.get('reason')}: {e.get('message')} ({e.get('location', '')})" for e in row_errors)
            outcome.refused.append((row, messages))
    return outcome


class BigQueryStreamingSink(BigQuerySink[BigQueryStreamingOptions, InsertBatch]):
    """Streams rows into BigQuery with ``insertAll``."""

    type_name = "bigquery_streaming"

    def new_batch(self) -> InsertBatch:
        overhead = len(_BODY_START) + len(_BODY_END) + 1
        return InsertBatch(int(self.options.max_request_bytes) - overhead, self.name, self.options.max_rows_per_request)

    async def write(self, batch: InsertBatch) -> None:
        for _ in range(MAX_ROUNDS):
            if not any(batch.pending.values()):
                return
            await self._round(batch)
        raise RuntimeError(f"rows still unconfirmed after {MAX_ROUNDS} rounds of insertAll: {batch.counts()}")

    async def _round(self, batch: InsertBatch) -> None:
        """Send every pending row once, all requests running to the end; then raise the first error."""
        limiter = anyio.CapacityLimiter(self.options.concurrency)
        outcomes: dict[str, list[Outcome]] = {name: [] for name in TABLE_NAMES}
        failures: list[Exception] = []

        async def send(table: str, rows: list[EncodedRows]) -> None:
            async with limiter:
                try:
                    answer = await self.client.insert_all(self.options.dataset, self.names[table], request_body(rows))
                except Exception as exc:
                    failures.append(exc)
                    outcomes[table].append(Outcome(again=rows))
                    return
            outcomes[table].append(settle(rows, answer))

        limits = self.options.max_rows_per_request, int(self.options.max_request_bytes)
        async with anyio.create_task_group() as group:
            for table, rows in batch.pending.items():
                for chunk in requests(rows, *limits):
                    group.start_soon(send, table, chunk)
        now, dead_letters = time.time_ns() // 1000, []
        for table, table_outcomes in outcomes.items():
            if not table_outcomes:
                continue
            batch.pending[table] = [row for outcome in table_outcomes for row in outcome.again]
            batch.written[table] += sum(outcome.confirmed for outcome in table_outcomes)
            for row, error in (refused for outcome in table_outcomes for refused in outcome.refused):
                if table == "dead_letter":
                    raise RuntimeError(f"BigQuery refused dead_letter row {row.key}: {error}")
                key = row.key
                log.warning("BigQuery refused %s row %s, sent to dead_letter: %s", table, key, error)
                dead = rejected_row(table, key, row.json, error, self.name, now)
                dead_letters.append(_encoded(dead[DeadLetterCol.dead_letter_id], encode_row("dead_letter", dead)))
        batch.pending["dead_letter"] += dead_letters
        if failures:
            raise failures[0]
