"""What goes into the DuckDB sink comes back out unchanged, for generated visits."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import anyio
import duckdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clickflow.api import Message, RowBatch
from clickflow.parser import VisitParser
from clickflow.schema import TABLES
from clickflow_duckdb import DuckDBSink, DuckDBSinkOptions
from tests.test_parser_properties import messages


def write(path: Path, rows: RowBatch) -> None:
    async def go() -> None:
        sink = DuckDBSink("duckdb", DuckDBSinkOptions(path=str(path)))
        await sink.open()
        batch = sink.new_batch()
        batch.add(rows)
        await sink.write(batch)
        await sink.close()

    anyio.run(go)


def read_back(path: Path, table: str) -> list[tuple[Any, ...]]:
    columns = [f"epoch_us({c.name})" if c.type == "TIMESTAMP" else c.name for c in TABLES[table].columns]
    key = ", ".join(TABLES[table].key)
    with duckdb.connect(str(path), read_only=True) as con:
        return con.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {key}").fetchall()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, min_size=1, max_size=6))
def test_rows_round_trip_through_duckdb(payloads: list[bytes]) -> None:
    rows = VisitParser().parse([Message(p, f"m{i}") for i, p in enumerate(payloads)], "prop", 1_700_000_000_123_456)
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "round.duckdb"
        write(path, rows)
        for table, expected in rows.tables.items():
            key = [TABLES[table].index(column) for column in TABLES[table].key]
            assert read_back(path, table) == sorted(expected, key=lambda row: [row[i] for i in key]), table
