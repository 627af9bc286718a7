"""Rows as the Storage Write API takes them: protocol buffers built from the table's schema, or Arrow.

Both encode the row tuples the parser makes; timestamps go as microseconds since the epoch, which
is what the Write API reads for a TIMESTAMP column in either format. Rows are cut into chunks whose
encoding stays under a request's byte limit (the API's is 10 MB). ``bench/bench_bigquery.py``
compares the two: Arrow encodes several times faster (one C pass per column), protocol buffers
need nothing beyond the Write API's own client.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from clickflow.schema import Table

Row = tuple[Any, ...]
RowFormatName = Literal["proto", "arrow"]
_PROTO_TYPES = {"STRING": 9, "INT64": 3, "FLOAT64": 1, "TIMESTAMP": 3}  # TYPE_STRING, TYPE_INT64, TYPE_DOUBLE
REQUEST_OVERHEAD = 64 * 1024
"""Room left in a request for its stream name, schema and framing."""


@dataclass
class Chunk:
    rows: list[Row]
    payload: Any
    """``ProtoRows`` or ``ArrowRecordBatch``, ready for a request."""
    size: int = 0
    """Bytes of the encoded rows: over a request's limit only for a chunk of one row."""


class ProtoFormat:
    """Each row a proto2 message whose fields are the table's columns, in order."""

    def __init__(self, table: Table) -> None:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

        self.descriptor = descriptor_pb2.DescriptorProto(name=f"{table.name}_row")
        for number, column in enumerate(table.columns, 1):
            self.descriptor.field.add(name=column.name, number=number, type=_PROTO_TYPES[column.type], label=1)
        file = descriptor_pb2.FileDescriptorProto(name=f"clickflow_{table.name}.proto", syntax="proto2")
        file.message_type.add().CopyFrom(self.descriptor)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(file)
        self._message = message_factory.GetMessageClass(pool.FindMessageTypeByName(self.descriptor.name))
        self._names = table.column_names

    def chunks(self, rows: list[Row], max_bytes: int) -> list[Chunk]:
        from google.cloud.bigquery_storage_v1 import types

        message, names = self._message, self._names
        encoded = [
            message(
                **{name: value for name, value in zip(names, row, strict=True) if value is not None}
            ).SerializeToString()
            for row in rows
        ]
        chunks, start, size = [], 0, 0
        limit = max_bytes - REQUEST_OVERHEAD
        for index, data in enumerate(encoded):
            if index > start and size + len(data) > limit:
                chunks.append(Chunk(rows[start:index], types.ProtoRows(serialized_rows=encoded[start:index]), size))
                start, size = index, 0
            size += len(data) + 4
        if start < len(rows):
            chunks.append(Chunk(rows[start:], types.ProtoRows(serialized_rows=encoded[start:]), size))
        return chunks

    def data(self, chunk: Chunk, with_schema: bool) -> dict[str, Any]:
        from google.cloud.bigquery_storage_v1 import types

        schema = {"writer_schema": types.ProtoSchema(proto_descriptor=self.descriptor)} if with_schema else {}
        return {"proto_rows": types.AppendRowsRequest.ProtoData(rows=chunk.payload, **schema)}


class ArrowFormat:
    """Rows as an Arrow record batch: the tuples transposed into columns, each built in one C pass."""

    def __init__(self, table: Table) -> None:
        try:
            import pyarrow as pa
        except ImportError as exc:
            raise RuntimeError("row_format: arrow needs pyarrow: pip install pyarrow") from exc
        kinds = {"STRING": pa.string(), "INT64": pa.int64(), "FLOAT64": pa.float64(),
                 "TIMESTAMP": pa.timestamp("us", tz="UTC")}  # fmt: skip
        self.schema = pa.schema([(c.name, kinds[c.type], not c.required) for c in table.columns])
        self._types = [field.type for field in self.schema]

    def _batch(self, rows: list[Row]) -> Any:
        import pyarrow as pa

        columns = [pa.array(column, kind) for column, kind in zip(zip(*rows, strict=True), self._types, strict=True)]
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    def chunks(self, rows: list[Row], max_bytes: int) -> list[Chunk]:
        from google.cloud.bigquery_storage_v1 import types

        pending, chunks = [rows], []
        while pending:
            part = pending.pop()
            serialized = self._batch(part).serialize().to_pybytes()
            if len(serialized) > max_bytes - REQUEST_OVERHEAD and len(part) > 1:
                middle = len(part) // 2
                pending += [part[middle:], part[:middle]]
                continue
            payload = types.ArrowRecordBatch(serialized_record_batch=serialized, row_count=len(part))
            chunks.append(Chunk(part, payload, len(serialized)))
        return chunks

    def data(self, chunk: Chunk, with_schema: bool) -> dict[str, Any]:
        from google.cloud.bigquery_storage_v1 import types

        schema = {}
        if with_schema:
            schema["writer_schema"] = types.ArrowSchema(serialized_schema=self.schema.serialize().to_pybytes())
        return {"arrow_rows": types.AppendRowsRequest.ArrowData(rows=chunk.payload, **schema)}


RowFormat = ProtoFormat | ArrowFormat


def row_format(name: RowFormatName, table: Table) -> RowFormat:
    return ProtoFormat(table) if name == "proto" else ArrowFormat(table)
