"""An example sink: appends each table's rows, as JSON objects, to DIRECTORY/TABLE.ndjson."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio

from clickflow import TABLES, AnySink, Register, RowBatch, Sink, SinkOptions, hookimpl


class NdjsonSinkOptions(SinkOptions, kw_only=True):
    directory: str


def _json_value(value: Any, column_type: str) -> Any:
    if column_type == "TIMESTAMP" and value is not None:
        return datetime.fromtimestamp(value / 1e6, UTC).isoformat()
    return value


class NdjsonSink(Sink[NdjsonSinkOptions]):
    """Appends rows to one JSON-lines file per table (example plugin)."""

    type_name = "ndjson"

    async def open(self) -> None:
        await anyio.Path(self.options.directory).mkdir(parents=True, exist_ok=True)

    async def write(self, batch: RowBatch) -> None:
        await anyio.to_thread.run_sync(self._write, batch)

    def _write(self, batch: RowBatch) -> None:
        for name, table in TABLES.items():
            rows = batch.tables[name]
            if not rows:
                continue
            types = [c.type for c in table.columns]
            with open(Path(self.options.directory) / f"{name}.ndjson", "a", encoding="utf-8") as out:
                for row in batch.dicts(name):
                    values = {k: _json_value(v, t) for (k, v), t in zip(row.items(), types, strict=True)}
                    out.write(json.dumps(values) + "\n")


@hookimpl
def register_sinks(register: Register[AnySink]) -> None:
    register(NdjsonSink)
