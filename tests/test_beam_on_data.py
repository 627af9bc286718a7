"""Beam translations run on data (``tests/test_beam.py`` runs whole file pipelines): Pub/Sub messages
through the parser into the JSON objects ``WriteToBigQuery`` is given, and BigQuery's refused rows
into dead letters. Beam's Pub/Sub and BigQuery connectors themselves cannot reach the emulators."""

from __future__ import annotations

from typing import Any

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from clickflow.api import Message
from clickflow.beam.launch import BATCH_RUNNER
from clickflow.beam.transforms import parse
from clickflow.parser import VisitParser
from clickflow.schema import TABLE_NAMES
from clickflow_bigquery.beam import as_json, refused_as_dead_letters
from clickflow_bigquery.rows import ROW_ENCODERS
from clickflow_pubsub.beam import message
from clickflow_simulator.generator import VisitGenerator

WALL_CLOCK = ("ingested_at", "received_at")


def without_wall_clock(row: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(sorted((k, v) for k, v in row.items() if k not in WALL_CLOCK))


def test_pubsub_messages_become_the_json_rows_bigquery_is_sent() -> None:
    payloads = list(VisitGenerator(seed=8, malformed_rate=0.2).messages(60))
    received = [PubsubMessage(data, {}, message_id=str(1000 + n)) for n, data in enumerate(payloads)]
    direct = VisitParser().parse([Message(m.data, m.message_id) for m in received], "pull", 0)
    expected = {t: [without_wall_clock(r) for r in ROW_ENCODERS[t].objects(direct.tables[t])] for t in TABLE_NAMES}
    assert all(expected.values()), "the sample should fill every table"

    with BeamTestPipeline(runner=BATCH_RUNNER) as pipeline:
        batches = pipeline | beam.Create(received) | "Message" >> beam.Map(message)
        tables = parse(batches, "pull")
        for table in TABLE_NAMES:
            rows = as_json(tables[table], table) | f"Comparable {table}" >> beam.Map(without_wall_clock)
            assert_that(rows, equal_to(expected[table]), label=f"Check {table}")


def test_refused_rows_become_dead_letter_json_rows() -> None:
    event = {"event_id": "v1:0", "visit_id": "v1", "page_url": "https://e.com/" + "x" * 10}
    visit = {"visit_id": "v2", "session_id": "S"}
    failed = [
        ("p:d.events", event, [{"reason": "invalid", "message": "no such field: x"}]),
        ("p:d.visits", visit, [{"reason": "invalid", "message": "bad"}]),
    ]
    with BeamTestPipeline(runner=BATCH_RUNNER) as pipeline:
        events = pipeline | "Events" >> beam.Create(failed[:1])
        visits = pipeline | "Visits" >> beam.Create(failed[1:])
        dead = (
            refused_as_dead_letters(events, "events", "bq"),
            refused_as_dead_letters(visits, "visits", "bq"),
        ) | beam.Flatten()
        rows = as_json(dead, "dead_letter") | beam.Map(
            lambda r: (r["dead_letter_id"], r["reason"], r["event_index"], r["error"], r["payload_encoding"])
        )
        assert_that(rows, equal_to([
            ("events/v1:0", "bigquery_rejected", 0, "events: no such field: x", "utf-8"),
            ("visits/v2", "bigquery_rejected", None, "visits: bad", "utf-8"),
        ]))  # fmt: skip
