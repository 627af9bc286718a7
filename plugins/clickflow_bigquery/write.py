"""The ``bigquery_write`` sink: BigQuery's Storage Write API, over gRPC.

``mode: default`` appends to each table's default stream through one long-lived connection per
table: rows are visible at once, at least once. The Write API has no ``insertId``, so a message
Pub/Sub delivers again (after a crash before its acknowledgement) is stored again with the same
keys; ``sql/deduplicated_views.sql`` shows the tables once per key.

``mode: pending`` writes each batch into a pending stream per table, finalizes them and commits
each table's stream: nothing of a batch is visible before its commit, and a batch cut short before
it leaves nothing (pending streams are dropped). The batch remembers which tables are committed,
so a retried write does not commit a table twice. Duplicates remain possible only when the process
dies between the first table's commit and the acknowledgement to the source.

A request BigQuery refuses for some of its rows (the API then appends none of them) is sent again
without those rows, which become ``dead_letter`` rows (``bigquery_rejected``). Unavailable,
deadline, internal and quota errors are raised for the runtime to retry; an invalid request, a
missing table or a denied permission fails the batch at once (``PermanentWriteError``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import anyio

from clickflow.api import PermanentWriteError, RowBatch
from clickflow.options import BatchLimits, ByteSize, Duration, check_range
from clickflow.schema import TABLE_NAMES, TABLES, DeadLetterCol
from clickflow_bigquery.common import BigQueryOptions, BigQuerySink
from clickflow_bigquery.rowformats import REQUEST_OVERHEAD, Chunk, Row, RowFormat, RowFormatName, row_format
from clickflow_bigquery.rows import ROW_IDS, encode_row, rejected_row, too_large_row

if TYPE_CHECKING:
    from google.cloud.bigquery_storage_v1.services.big_query_write import BigQueryWriteAsyncClient

log = logging.getLogger(__name__)

EMULATOR_HOST = "BIGQUERY_STORAGE_EMULATOR_HOST"
"""``host:port`` of a Write API emulator: an insecure channel, no credentials."""
APPEND_TIMEOUT = 120.0
ROW_ERROR_ROUNDS = 5
PERMANENT = ("InvalidArgument", "NotFound", "PermissionDenied", "Unauthenticated", "FailedPrecondition")


class BigQueryWriteOptions(BigQueryOptions, kw_only=True):
    mode: Literal["default", "pending"] = "default"
    """default: at least once, at once; pending: each batch committed whole."""
    row_format: RowFormatName = "proto"
    """proto, or arrow (faster; needs pyarrow)."""
    max_request_bytes: ByteSize = ByteSize(9 * 1024 * 1024)
    """The API's limit: 10 MB."""
    batch: BatchLimits = BatchLimits(max_rows=50_000, max_bytes=ByteSize(32 << 20), max_age=Duration(seconds=1))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range("max_request_bytes", self.max_request_bytes, 1024 * 1024, 10 * 1000 * 1000)
        if self.row_format == "arrow" and importlib.util.find_spec("pyarrow") is None:
            raise ValueError("row_format: arrow needs pyarrow, which is not installed (pip install pyarrow)")


@dataclass
class WriteBatch(RowBatch):
    """Rows per table, and what is stored of them, so a retried write repeats nothing stored."""

    done: set[str] = field(default_factory=set)
    """Tables appended in full (default mode) or committed (pending mode)."""
    appended: dict[str, int] = field(default_factory=dict)
    """Default mode: how many of a table's rows are appended (refused ones included)."""
    dead_letter_ids: set[str] = field(default_factory=set)
    """Of the dead letters the sink made (rows refused, or too large for any request): a retry
    in pending mode, which appends every row again, makes each once."""

    def add_dead_letter(self, row: Row) -> None:
        if (key := row[DeadLetterCol.dead_letter_id]) not in self.dead_letter_ids:
            self.dead_letter_ids.add(key)
            self.tables["dead_letter"].append(row)


class AppendConnection:
    """One AppendRows call to a write stream, request by request; reopened after a failure."""

    def __init__(self, client: BigQueryWriteAsyncClient, stream: str, rows: RowFormat) -> None:
        self._client, self._stream, self._format = client, stream, rows
        self._send: Any = None
        self._responses: Any = None

    async def append(self, chunk: Chunk, offset: int | None) -> Any:
        from google.cloud.bigquery_storage_v1 import types

        first = self._send is None
        if first:
            self._send, receive = anyio.create_memory_object_stream[Any](1)

            async def requests() -> AsyncIterator[Any]:
                async with receive:
                    async for request in receive:
                        yield request

            self._responses = (await self._client.append_rows(requests())).__aiter__()
        request = types.AppendRowsRequest(write_stream=self._stream, **self._format.data(chunk, with_schema=first))
        if offset is not None:
            request.offset = offset
        try:
            with anyio.fail_after(APPEND_TIMEOUT):
                await self._send.send(request)
                return await self._responses.__anext__()
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """End the call: half-close, then let the server finish it."""
        send, responses, self._send, self._responses = self._send, self._responses, None, None
        if send is not None:
            await send.aclose()
            with anyio.move_on_after(5, shield=True), contextlib.suppress(Exception):  # a broken call ends so too
                async for _ in responses:
                    pass


class BigQueryWriteSink(BigQuerySink[BigQueryWriteOptions, WriteBatch]):
    """Writes rows with BigQuery's Storage Write API (default or pending streams)."""

    type_name = "bigquery_write"
    beam: ClassVar[str | None] = None  # Beam's Storage Write API transform needs its Java expansion service
    _writer: BigQueryWriteAsyncClient | None = None

    async def open(self) -> None:
        await super().open()
        try:
            self._writer = _write_client(self.options.service_file)
        except ImportError as exc:
            raise RuntimeError("the bigquery_write sink needs: pip install 'clickflow[gcp]'") from exc
        self._formats = {name: row_format(self.options.row_format, table) for name, table in TABLES.items()}
        self._default: dict[str, AppendConnection] = {}

    def new_batch(self) -> WriteBatch:
        return WriteBatch()

    async def write(self, batch: WriteBatch) -> None:
        try:
            if self.options.mode == "default":
                await self._write_default(batch)
            else:
                await self._write_pending(batch)
        except Exception as exc:
            if type(exc).__name__ in PERMANENT:
                raise PermanentWriteError(f"the Write API refused the batch: {exc}") from exc
            raise

    async def _write_default(self, batch: WriteBatch) -> None:
        assert self._writer is not None
        for table in TABLE_NAMES:  # dead_letter last: it takes the rows the others refuse
            if table in batch.done or not batch.tables[table]:
                continue
            connection = self._default.get(table)
            if connection is None:
                stream = self._stream(table)
                connection = self._default[table] = AppendConnection(self._writer, stream, self._formats[table])
            await self._append(connection, table, batch, offsets=False)
            batch.done.add(table)

    async def _write_pending(self, batch: WriteBatch) -> None:
        from google.cloud.bigquery_storage_v1 import types

        assert self._writer is not None
        streams: dict[str, str] = {}
        for table in TABLE_NAMES:
            if table in batch.done or not batch.tables[table]:
                continue
            stream = await self._writer.create_write_stream(
                parent=self._table_path(table), write_stream=types.WriteStream(type_=types.WriteStream.Type.PENDING)
            )
            connection = AppendConnection(self._writer, stream.name, self._formats[table])
            try:
                await self._append(connection, table, batch, offsets=True)
            finally:
                await connection.close()
            await self._writer.finalize_write_stream(name=stream.name)
            streams[table] = stream.name
        for table, stream_name in streams.items():
            request = types.BatchCommitWriteStreamsRequest(parent=self._table_path(table), write_streams=[stream_name])
            answer = await self._writer.batch_commit_write_streams(request=request)
            if answer.stream_errors:
                raise RuntimeError(
                    f"{table}: commit failed: {'; '.join(e.error_message for e in answer.stream_errors)}"
                )
            batch.done.add(table)

    async def _append(self, connection: AppendConnection, table: str, batch: WriteBatch, offsets: bool) -> None:
        """Append ``table``'s rows (in default mode, those not appended by an earlier attempt); rows
        BigQuery refuses, and rows too large for any request, go to the batch's dead letters (the
        dead letters' own too: so their table is read again once its rows are through)."""
        rows_format, limit = self._formats[table], int(self.options.max_request_bytes)
        position = 0 if offsets else batch.appended.get(table, 0)
        offset = 0
        while position < len(batch.tables[table]):
            for chunk in rows_format.chunks(batch.tables[table][position:], limit):
                if chunk.size > limit - REQUEST_OVERHEAD:  # one row, as chunks are cut
                    (row,) = chunk.rows
                    batch.add_dead_letter(too_large_row(table, ROW_IDS[table](row), encode_row(table, row), limit,
                                                        self.name))  # fmt: skip
                else:
                    offset += await self._append_chunk(connection, table, chunk, offset if offsets else None, batch)
                position += len(chunk.rows)
                if not offsets:
                    batch.appended[table] = position

    async def _append_chunk(
        self, connection: AppendConnection, table: str, chunk: Chunk, offset: int | None, batch: WriteBatch
    ) -> int:
        """Append one chunk, its refused rows left out; returns how many rows were appended."""
        for _ in range(ROW_ERROR_ROUNDS):
            answer = await connection.append(chunk, offset)
            if answer.row_errors:
                chunk = self._without_refused(table, chunk, answer.row_errors, batch)
                if not chunk.rows:
                    return 0
                continue
            if answer.error.code:
                raise RuntimeError(f"{table}: append failed: {answer.error.message} (code {answer.error.code})")
            return len(chunk.rows)
        raise RuntimeError(f"{table}: rows still refused after {ROW_ERROR_ROUNDS} rounds")

    def _without_refused(self, table: str, chunk: Chunk, errors: Any, batch: WriteBatch) -> Chunk:
        if table == "dead_letter":
            raise RuntimeError(f"BigQuery refused dead_letter rows: {[e.message for e in errors]}")
        refused = {e.index: e.message for e in errors}
        now = time.time_ns() // 1000
        for index, message in refused.items():
            row = chunk.rows[index]
            key = ROW_IDS[table](row)
            log.warning("BigQuery refused %s row %s, sent to dead_letter: %s", table, key, message)
            batch.add_dead_letter(rejected_row(table, key, encode_row(table, row), message, self.name, now))
        kept: list[Row] = [row for index, row in enumerate(chunk.rows) if index not in refused]
        parts = self._formats[table].chunks(kept, int(self.options.max_request_bytes)) if kept else []
        return parts[0] if parts else Chunk([], None)

    def _table_path(self, table: str) -> str:
        return f"projects/{self.options.project}/datasets/{self.options.dataset}/tables/{self.names[table]}"

    def _stream(self, table: str) -> str:
        return f"{self._table_path(table)}/streams/_default"

    async def close_connections(self) -> None:
        """End the default streams' long-lived connections cleanly (the server sees a half-close)."""
        for connection in getattr(self, "_default", {}).values():
            await connection.close()

    async def close(self) -> None:
        await self.close_connections()
        if self._writer is not None:
            await self._writer.transport.close()
            self._writer = None
        await super().close()


def _write_client(service_file: str | None) -> BigQueryWriteAsyncClient:
    from google.cloud.bigquery_storage_v1.services.big_query_write import BigQueryWriteAsyncClient

    host = os.environ.get(EMULATOR_HOST)
    if host:
        import grpc
        from google.auth.credentials import AnonymousCredentials
        from google.cloud.bigquery_storage_v1.services.big_query_write.transports import (
            BigQueryWriteGrpcAsyncIOTransport,
        )

        channel = grpc.aio.insecure_channel(host)
        return BigQueryWriteAsyncClient(
            transport=BigQueryWriteGrpcAsyncIOTransport(channel=channel, credentials=AnonymousCredentials())
        )
    credentials = None
    if service_file:
        from google.oauth2 import service_account

        scopes = ["https://www.googleapis.com/auth/bigquery"]
        credentials = service_account.Credentials.from_service_account_file(service_file, scopes=scopes)
    return BigQueryWriteAsyncClient(credentials=credentials)
