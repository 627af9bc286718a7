"""The ``duckdb`` sink on Beam's local runners: table files written by Beam, loaded at the end.

Workers write each table as JSON-lines shards in the sink's spool format
(``DATABASE.spool/beam/TABLE-*.ndjson``); once the pipeline has finished, the
launching process loads them into the database in one transaction, with the
same de-duplicating inserts as the async sink, after the batches a killed
``commit_every`` run left in the sink's log (they were acknowledged). A database file on one machine
cannot be written from Dataflow's workers, and a streaming pipeline never
finishes, so both are refused.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from typing import Any

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from clickflow.beam import BeamWrite, Tables, on_dataflow
from clickflow.schema import TABLE_NAMES
from clickflow_duckdb import DuckDBSinkOptions, connect, load_files, spool_directory
from clickflow_duckdb.spool import encode_lines

SHARDS = "beam"


class WriteDuckDB(BeamWrite):
    def refusal(self, options: PipelineOptions) -> str | None:
        if on_dataflow(options):
            return "duckdb writes a file on this machine; on Dataflow use bigquery_load or bigquery_streaming"
        if options.view_as(StandardOptions).streaming:
            return "duckdb loads its files when a batch pipeline ends; a streaming source never ends"
        return None

    def expand(self, tables: Tables) -> None:
        options: DuckDBSinkOptions = self.sink.options
        if not options.create_tables:  # a missing table or column is named before the run, not after it
            connect(options).close()
        self.spool = spool_directory(options.path)
        self.shards = os.path.join(self.spool, SHARDS)
        for table in TABLE_NAMES:
            _ = (
                tables[table]
                | f"Encode {table}" >> beam.Map(shard_lines)
                | f"Write {table}"
                >> beam.io.WriteToText(os.path.join(self.shards, table), ".ndjson", coder=beam.coders.BytesCoder())
            )

    def finish(self, rows: Mapping[str, int]) -> int:
        paths = {table: os.path.join(self.shards, f"{table}-*.ndjson") for table in TABLE_NAMES}
        stored_already = load_files(self.sink.options, paths, rows)
        shutil.rmtree(self.spool)
        return stored_already


def shard_lines(rows: list[tuple[Any, ...]]) -> bytes:
    """A batch of rows as spool lines, less the last newline (Beam adds one per element)."""
    return encode_lines(rows)[:-1]
