"""Beam translations run on data (``tests/test_beam.py`` runs whole file pipelines): Pub/Sub messages
through the parser into the JSON objects ``WriteToBigQuery`` is given, and BigQuery's refused rows
into dead letters. Beam's Pub/Sub and BigQuery connectors themselves cannot reach the emulators."""

from __future__ import annotations

from typing import Any

import apache_beam as beam
import msgspec
from apache_beam.io.gcp.pubsub import PubsubMessage
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from clickflow.api import Message
from clickflow.beam.launch import BATCH_RUNNER
from clickflow.beam.transforms import parse
from clickflow.parser import VisitParser
from clickflow.schema import TABLE_NAMES
from clickflow_bigquery.beam import as_json, json_objects, refused_as_dead_letters, within_requests
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


def test_rows_too_large_for_an_insert_request_become_dead_letters_of_their_head() -> None:
    """A message of 9 MB that is not JSON, kept whole as a dead letter (12 MB in base64), and a page
    URL of 6 MB: ``WriteToBigQuery`` refuses a row over 9 MB, and a dead letter it refuses fails the
    pipeline. Both become ``too_large`` dead letters of their head, as in the async sink; the
    event's joins the other dead letters, and fits."""
    url = "https://e.com/" + "p" * (6 << 20)
    event = {"event_type": "page_view", "timestamp": "2024-07-01T09:00:00Z", "details": {"page_url": url}}
    messages = [
        Message(b"x" * (9 << 20), "garbage"),
        Message(msgspec.json.encode({"session_id": "s", "events": [event]}), "url"),
    ]
    parsed = VisitParser().parse(messages, "test", 0)
    limit = 5 << 20  # bigquery_streaming's max_request_bytes

    def summary(row: dict[str, Any]) -> tuple[str, str, int, bool]:
        table = row["dead_letter_id"].partition("/")[0]
        return table, row["reason"], len(row["payload"]), "is over max_request_bytes" in row["error"]

    with BeamTestPipeline(runner=BATCH_RUNNER) as pipeline:
        events = pipeline | "Events" >> beam.Create([parsed.tables["events"]])
        fitting_events, too_large_events = within_requests(events, "events", "bq", limit)
        dead = (pipeline | "Dead" >> beam.Create([parsed.tables["dead_letter"]]), too_large_events) | beam.Flatten()
        fitting, too_large = within_requests(dead, "dead_letter", "bq", limit)
        assert_that(fitting_events, equal_to([]), label="no event fits")
        fitting_rows = fitting | "Fitting" >> beam.FlatMap(json_objects, "dead_letter") | "F" >> beam.Map(summary)
        too_large_rows = too_large | "Too large" >> beam.FlatMap(json_objects, "dead_letter") | "T" >> beam.Map(summary)
        assert_that(fitting_rows, equal_to([("events", "too_large", 64 * 1024, True)]), label="fitting")
        assert_that(too_large_rows, equal_to([("dead_letter", "too_large", 64 * 1024, True)]), label="too large")
