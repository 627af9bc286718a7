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

import hashlib
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
from clickflow.parser import REASON_TOO_LARGE
from clickflow.schema import TABLE_NAMES, DeadLetterCol
from clickflow_bigquery.common import BigQueryOptions, BigQuerySink
from clickflow_bigquery.rows import ROW_ENCODERS, encode_row, rejected_row

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
class EncodedRow:
    key: str
    item: bytes
    """``{"insertId": key, "json": row}``, ready to join into a request body."""

    @property
    def json(self) -> bytes:
        """The row alone (needed only when BigQuery refuses it). The JSON-encoded key holds no bare
        quote, so the first ``,"json":`` is the field's own."""
        return self.item[self.item.index(_JSON_FIELD) + len(_JSON_FIELD) : -1]


KEPT_OF_TOO_LARGE = 64 * 1024
"""How much of a row too large for any request its dead letter keeps (less, if requests are small)."""


@dataclass
class InsertBatch:
    """Rows not yet confirmed by BigQuery, per table, encoded as they arrive."""

    max_item_bytes: int = 9 * 1024 * 1024
    """A row longer than this cannot go in any request: it becomes a ``too_large`` dead letter."""
    sink: str = "bigquery_streaming"
    pending: dict[str, list[EncodedRow]] = field(default_factory=lambda: {name: [] for name in TABLE_NAMES})
    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TABLE_NAMES, 0))

    def add(self, rows: RowBatch) -> None:
        limit = self.max_item_bytes
        for name, table_rows in rows.tables.items():
            if not table_rows:
                continue
            pending = self.pending[name]
            for key, item in zip(*ROW_ENCODERS[name].items(table_rows), strict=True):
                if len(item) <= limit:
                    pending.append(EncodedRow(key, item))
                else:
                    self.pending["dead_letter"].append(self._too_large(name, EncodedRow(key, item)))

    def _too_large(self, table: str, row: EncodedRow) -> EncodedRow:
        row_json, kept = row.json, min(KEPT_OF_TOO_LARGE, self.max_item_bytes // 4)
        digest = hashlib.sha256(row_json).hexdigest()
        error = f"row of {len(row_json)} bytes is over max_request_bytes (sha256 {digest}); the payload is its head"
        log.warning("%s: %s row %s is too large for insertAll; sent to dead_letter", self.sink, table, row.key)
        now = time.time_ns() // 1000
        dead = rejected_row(table, row.key, row_json[:kept], error, self.sink, now, REASON_TOO_LARGE)
        return _encoded(dead[DeadLetterCol.dead_letter_id], encode_row("dead_letter", dead))

    def __len__(self) -> int:
        return sum(map(len, self.pending.values())) + sum(self.written.values())

    def counts(self) -> dict[str, int]:
        return {name: self.written[name] + len(rows) for name, rows in self.pending.items()}

    def discard(self) -> None:
        self.pending = {name: [] for name in TABLE_NAMES}


def _encoded(key: str, row_json: bytes) -> EncodedRow:
    return EncodedRow(key, b'{"insertId":' + _encode_str(key) + _JSON_FIELD + row_json + b"}")


def requests(rows: list[EncodedRow], max_rows: int, max_bytes: int) -> Iterator[list[EncodedRow]]:
    """Consecutive slices of ``rows`` whose request bodies stay within both limits."""
    chunk: list[EncodedRow] = []
    size = len(_BODY_START) + len(_BODY_END)
    for row in rows:
        row_size = len(row.item) + 1
        if chunk and (len(chunk) == max_rows or size + row_size > max_bytes):
            yield chunk
            chunk, size = [], len(_BODY_START) + len(_BODY_END)
        if size + row_size > max_bytes:
            raise ValueError(f"row {row.key} alone is {row_size} bytes, over max_request_bytes ({max_bytes})")
        chunk.append(row)
        size += row_size
    if chunk:
        yield chunk


def request_body(rows: list[EncodedRow]) -> bytes:
    return _BODY_START + b",".join(row.item for row in rows) + _BODY_END


RETRIED_REASONS = frozenset({"stopped", "timeout", "backendError", "internalError", "rateLimitExceeded"})


@dataclass
class Outcome:
    """What one request settled: rows confirmed, rows to send again, rows refused (with why)."""

    confirmed: int = 0
    again: list[EncodedRow] = field(default_factory=list)
    refused: list[tuple[EncodedRow, str]] = field(default_factory=list)


def settle(rows: list[EncodedRow], answer: dict[str, object]) -> Outcome:
    """Sort a request's rows by the ``insertErrors`` of its 2xx answer."""
    outcome = Outcome()
    errors: dict[int, list[dict[str, str]]] = {
        int(e["index"]): e.get("errors", [])
        for e in answer.get("insertErrors", []) or []  # type: ignore[attr-defined]
    }
    for index, row in enumerate(rows):
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
        return InsertBatch(int(self.options.max_request_bytes) - overhead, self.name)

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

        async def send(table: str, rows: list[EncodedRow]) -> None:
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
                log.warning("BigQuery refused %s row %s, sent to dead_letter: %s", table, row.key, error)
                dead = rejected_row(table, row.key, row.json, error, self.name, now)
                dead_letters.append(_encoded(dead[DeadLetterCol.dead_letter_id], encode_row("dead_letter", dead)))
        batch.pending["dead_letter"] += dead_letters
        if failures:
            raise failures[0]
