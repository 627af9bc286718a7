"""The BigQuery sinks on Beam: one ``WriteToBigQuery`` per table, tables from the shared schema.

``bigquery_load`` writes with file loads and ``bigquery_streaming`` with
streaming inserts. Tables are created when missing (``create_tables``) with the
schema, day partitioning and clustering of ``tables.table_resource``; the
dataset must exist (``clickflow bigquery create-tables PIPELINE`` makes both).

Rows BigQuery refuses in a streaming insert come back from ``WriteToBigQuery``
and become ``dead_letter`` rows (reason ``bigquery_rejected``), as in the async
sink; transient errors are retried by Beam. A dead letter BigQuery refuses has
nowhere left to go, so it fails the pipeline instead of vanishing; a row longer than
one request (``max_request_bytes``) becomes a ``too_large`` dead letter of its head
before it is sent (``within_requests``). A load job
is all or nothing: Beam retries a failed job, then fails the pipeline.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import apache_beam as beam
import msgspec
from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery
from apache_beam.io.gcp.bigquery_tools import RetryStrategy
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, StandardOptions
from apache_beam.pvalue import PCollection

from clickflow.beam import BeamWrite, Tables
from clickflow.schema import TABLES
from clickflow_bigquery.common import BigQueryOptions
from clickflow_bigquery.rows import ROW_ENCODERS, ROW_IDS, encode_row, object_row_id, rejected_row, too_large_row
from clickflow_bigquery.tables import table_resource

DATA_TABLES = ("visits", "events", "purchase_items")


class WriteBigQuery(BeamWrite):
    @property
    def streaming_inserts(self) -> bool:
        return self.sink.type_name == "bigquery_streaming"

    def refusal(self, options: PipelineOptions) -> str | None:
        staging = getattr(self.sink.options, "staging", None)
        temp = options.view_as(GoogleCloudOptions).temp_location or ""
        if not self.streaming_inserts and not staging and not temp.startswith("gs://"):
            return "load jobs on Beam read their files from Cloud Storage: set staging: gs://... or --temp_location"
        return None

    def expand(self, tables: Tables) -> None:
        options: BigQueryOptions = self.sink.options
        names = options.table_names()
        streaming = bool(tables["visits"].pipeline.options.view_as(StandardOptions).streaming)
        sink, refused = self.sink.name, []
        limit = int(self.sink.options.max_request_bytes) if self.streaming_inserts else None
        for table in DATA_TABLES:
            rows = tables[table]
            if limit:
                rows, too_large = within_requests(rows, table, sink, limit)
                refused.append(too_large)
            written = as_json(rows, table) | self._write(table, streaming)
            if self.streaming_inserts:
                refused.append(refused_as_dead_letters(written.failed_rows_with_errors, table, sink))
        dead_letters = (tables["dead_letter"], *refused) | "All dead letters" >> beam.Flatten()
        if limit:
            fitting, too_large = within_requests(dead_letters, "dead_letter", sink, limit)
            dead_letters = (fitting, too_large) | "Dead letters within requests" >> beam.Flatten()
        written = as_json(dead_letters, "dead_letter") | self._write("dead_letter", streaming)
        if self.streaming_inserts:
            _ = written.failed_rows_with_errors | "Refused dead letters" >> beam.Map(unwritable, names["dead_letter"])

    def _write(self, table: str, streaming: bool) -> beam.PTransform[Any, Any]:
        """The write of one table (``streaming``: the pipeline runs in streaming mode)."""
        options: BigQueryOptions = self.sink.options
        resource = table_resource(TABLES[table])
        parameters = {key: resource[key] for key in ("timePartitioning", "clustering") if key in resource}
        arguments: dict[str, Any] = {}
        if self.streaming_inserts:
            arguments["method"] = WriteToBigQuery.Method.STREAMING_INSERTS
            arguments["insert_retry_strategy"] = RetryStrategy.RETRY_ON_TRANSIENT_ERROR
        else:
            arguments["method"] = WriteToBigQuery.Method.FILE_LOADS
            arguments["custom_gcs_temp_location"] = getattr(options, "staging", None)
            if streaming:  # loads on an unbounded input: one job per table this often
                arguments["triggering_frequency"] = max(1, int(options.batch.max_age.total_seconds()))
        return f"Write {table}" >> WriteToBigQuery(
            table=f"{options.project}:{options.dataset}.{options.table_names()[table]}",
            schema=resource["schema"],
            additional_bq_parameters=parameters,
            create_disposition=(
                BigQueryDisposition.CREATE_IF_NEEDED if options.create_tables else BigQueryDisposition.CREATE_NEVER
            ),
            write_disposition=BigQueryDisposition.WRITE_APPEND,
            **arguments,
        )


def as_json(batches: PCollection[Any], table: str) -> PCollection[Any]:
    """Batches of one table's row tuples as the JSON objects ``WriteToBigQuery`` takes, one per row."""
    return batches | f"JSON {table}" >> beam.FlatMap(json_objects, table)


def within_requests(
    batches: PCollection[Any], table: str, sink: str, max_request_bytes: int
) -> tuple[PCollection[Any], PCollection[Any]]:
    """Batches of ``table``'s rows that fit an insertAll request, and batches of ``too_large`` dead
    letters (their head, size and SHA-256, as the async sink makes them) for the rows that do not:
    BigQuery refuses such a row (``WriteToBigQuery`` at 9 MB), and a dead letter it refuses fails
    the pipeline, as a message of 10 MB kept whole as a dead letter (13 MB in base64) would."""
    split = batches | f"Fit {table}" >> beam.ParDo(_WithinRequests(table, sink, max_request_bytes)).with_outputs(
        _TOO_LARGE, main="rows"
    )
    return split.rows, split[_TOO_LARGE]


_TOO_LARGE = "too_large"


class _WithinRequests(beam.DoFn):
    def __init__(self, table: str, sink: str, max_request_bytes: int) -> None:
        self.table, self.sink, self.limit = table, sink, max_request_bytes

    def process(self, batch: list[tuple[Any, ...]]) -> Iterator[Any]:
        kept, dead = [], []
        for row in batch:
            # JSON writes a character in 6 bytes at most (\u0000): most rows need no encoding to tell
            if 6 * sum(len(value) for value in row if type(value) is str) + 4096 > self.limit:
                encoded = encode_row(self.table, row)
                if len(encoded) > self.limit:
                    dead.append(too_large_row(self.table, ROW_IDS[self.table](row), encoded, self.limit, self.sink))
                    continue
            kept.append(row)
        if kept:
            yield kept
        if dead:
            yield beam.pvalue.TaggedOutput(_TOO_LARGE, dead)


def refused_as_dead_letters(failed: PCollection[Any], table: str, sink: str) -> PCollection[Any]:
    """``WriteToBigQuery``'s refused rows of ``table`` as batches of ``dead_letter`` rows."""
    return failed | f"Refused {table}" >> beam.Map(refused_row, table, sink)


def json_objects(rows: list[tuple[Any, ...]], table: str) -> Iterator[dict[str, Any]]:
    """A batch of one table's row tuples as the JSON objects ``WriteToBigQuery`` takes."""
    return iter(ROW_ENCODERS[table].objects(rows))


def refused_row(failed: tuple[str, dict[str, Any], list[Any]], table: str, sink: str) -> list[tuple[Any, ...]]:
    """A batch of one ``dead_letter`` row for a row BigQuery refused: ``(destination, row, errors)``."""
    _, row, errors = failed
    error = "; ".join(str(e.get("message", e)) if isinstance(e, dict) else str(e) for e in errors)
    now = time.time_ns() // 1000
    return [rejected_row(table, object_row_id(table)(row), msgspec.json.encode(row), error, sink, now)]


def unwritable(failed: tuple[str, dict[str, Any], list[Any]], table: str) -> None:
    _, row, errors = failed
    raise RuntimeError(f"BigQuery refused dead letter {row.get('dead_letter_id')} in {table}: {errors}")
