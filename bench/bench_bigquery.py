"""BigQuery sinks against the BigQuery emulator, next to the emulator's own raw insert rate.

    python bench/bench_bigquery.py [--visits 5000]

In one run, on the same simulated visits (about 7 rows per visit):
1. raw insertAll: the rows, pre-encoded, sent in 500-row requests with 8 in flight, no clickflow;
2. raw load: the rows as one newline-delimited JSON file per table, one load job each;
3. clickflow file -> parser -> bigquery_streaming;
4. clickflow file -> parser -> bigquery_load;
5. clickflow file -> parser -> bigquery_write (the Storage Write API, over gRPC), in its default and
   pending modes, with protocol-buffer and Arrow rows.
Prints rows per second for each. The emulator (Python, DuckDB) is the bottleneck
here; against BigQuery itself the ratios, not the figures, carry over. First, without the emulator,
the CPU cost of encoding the same rows for each API: insertAll's JSON items, the load jobs' JSON
lines (written to their batch file, with their keys' digest), the Write API's protocol buffers and
its Arrow record batches (microseconds per row, best of 5).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import anyio

from clickflow.api import Message, RowBatch
from clickflow.config import parse_pipeline
from clickflow.parser import VisitParser
from clickflow.plugins import load_plugins
from clickflow.runtime import Runtime
from clickflow.schema import TABLE_NAMES
from clickflow_bigquery.client import BigQueryClient
from clickflow_bigquery.streaming import (
    InsertBatch,
    request_body,
    requests,
)
from clickflow_bigquery.tables import ensure_tables
from clickflow_simulator import VisitGenerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.conftest import files_into
from tests.gcp_emulators import PROJECT, bqemulator, running_bigquery_emulator


async def raw_insert(batch: InsertBatch, dataset: str) -> float:
    names = {name: name for name in TABLE_NAMES}
    async with BigQueryClient(PROJECT) as client:
        await ensure_tables(client, dataset, names, create=True)
        limiter = anyio.CapacityLimiter(8)
        started = time.perf_counter()

        async def send(table: str, body: bytes) -> None:
            async with limiter:
                await client.insert_all(dataset, table, body)

        async with anyio.create_task_group() as group:
            for table, rows in batch.pending.items():
                for chunk in requests(rows, 500, 5 * 1024 * 1024):
                    group.start_soon(send, table, request_body(chunk))
        return time.perf_counter() - started


async def raw_load(batch: InsertBatch, dataset: str, directory: Path) -> float:
    names = {name: name for name in TABLE_NAMES}
    files = {}
    for table, rows in batch.pending.items():
        files[table] = directory / f"{table}.json"
        files[table].write_bytes(b"\n".join(row.json for encoded in rows for row in encoded.rows()) + b"\n")
    async with BigQueryClient(PROJECT) as client:
        await ensure_tables(client, dataset, names, create=True)
        started = time.perf_counter()
        for table, path in files.items():
            job = {"configuration": {"load": {
                "destinationTable": {"projectId": PROJECT, "datasetId": dataset, "tableId": table},
                "sourceFormat": "NEWLINE_DELIMITED_JSON", "writeDisposition": "WRITE_APPEND",
            }}}  # fmt: skip
            with path.open("rb") as data:
                await client.upload_job(job, data)
        return time.perf_counter() - started


def pipeline_seconds(path: Path, sink: str) -> float:
    runtime = Runtime(parse_pipeline(files_into(path, sink), load_plugins(), "bench.yaml", {}))
    started = time.perf_counter()
    anyio.run(runtime.run)
    return time.perf_counter() - started


def encoding_costs(rows: RowBatch, spool: str) -> None:
    from clickflow.schema import TABLES
    from clickflow_bigquery.load import TableFile
    from clickflow_bigquery.rowformats import ArrowFormat, ProtoFormat
    from clickflow_bigquery.rows import ROW_ENCODERS

    def load_lines(name: str, table_rows: list[tuple[object, ...]]) -> None:
        table_file = TableFile(spool, name)  # appended to, round after round
        table_file.add(table_rows)
        table_file.close()

    encoders = {
        "insertAll JSON items (bigquery_streaming)": lambda name, table_rows: ROW_ENCODERS[name].request_rows(
            table_rows),
        "JSON lines, keys digested (bigquery_load)": load_lines,
        "protocol buffers (bigquery_write, proto)": lambda name, table_rows: formats["proto"][name].chunks(
            table_rows, 9 * 1024 * 1024),
        "Arrow record batches (bigquery_write, arrow)": lambda name, table_rows: formats["arrow"][name].chunks(
            table_rows, 9 * 1024 * 1024),
    }  # fmt: skip
    formats = {
        "proto": {n: ProtoFormat(t) for n, t in TABLES.items()},
        "arrow": {n: ArrowFormat(t) for n, t in TABLES.items()},
    }
    total = len(rows)
    for label, encode in encoders.items():
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            for name, table_rows in rows.tables.items():
                if table_rows:
                    encode(name, table_rows)
            best = min(best, time.process_time() - started)
        print(f"encoding: {label:44s} {best / total * 1e6:5.2f} us/row")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--visits", type=int, default=5000)
    args = parser.parse_args()
    launcher = bqemulator()
    if launcher is None:
        sys.exit("the BigQuery emulator could not be installed (see tests/bigquery-emulator.txt)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        payloads = list(VisitGenerator(seed=1, malformed_rate=0.01).messages(args.visits))
        (work / "visits.jsonl").write_bytes(b"\n".join(payloads) + b"\n")
        rows = VisitParser().parse(
            [Message(p, f"m{i}") for i, p in enumerate(payloads)], "bench", time.time_ns() // 1000
        )
        total = len(rows)
        (work / "encoding").mkdir()
        encoding_costs(rows, str(work / "encoding"))
        with running_bigquery_emulator(launcher, work / "emulator.log", work) as emulator:
            os.environ["BIGQUERY_EMULATOR_HOST"] = emulator.host
            os.environ["BIGQUERY_STORAGE_EMULATOR_HOST"] = emulator.grpc_host
            print(f"{args.visits:,} visits = {total:,} rows; BigQuery emulator at {emulator.host}")
            for label, seconds in (
                ("raw insertAll (500 rows/request, 8 in flight)", anyio.run(raw_insert, _batch(rows), "raw_insert")),
                ("raw load jobs (one per table)", anyio.run(raw_load, _batch(rows), "raw_load", work)),
                ("clickflow -> bigquery_streaming", pipeline_seconds(
                    work / "visits.jsonl", f"type: bigquery_streaming, project: {PROJECT}, dataset: streaming")),
                ("clickflow -> bigquery_load", pipeline_seconds(
                    work / "visits.jsonl", f"type: bigquery_load, project: {PROJECT}, dataset: load")),
                *((f"clickflow -> bigquery_write ({mode}, {kind})", pipeline_seconds(
                    work / "visits.jsonl", f"type: bigquery_write, project: {PROJECT}, dataset: write_{mode}_{kind}, "
                    f"mode: {mode}, row_format: {kind}"))
                  for mode in ("default", "pending") for kind in ("proto", "arrow")),
            ):  # fmt: skip
                print(f"{label:48s} {seconds:7.2f}s {total / seconds:>10,.0f} rows/s")


def _batch(rows: RowBatch) -> InsertBatch:
    batch = InsertBatch()
    batch.add(rows)
    return batch


if __name__ == "__main__":
    main()
