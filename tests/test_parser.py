"""The parser's contract: every message and every event ends up as a row or a dead letter."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from clickflow import fastpath
from clickflow.api import Message, RowBatch
from clickflow.parser import VisitParser, parse_timestamp_us, visit_id_for
from clickflow.schema import TABLES
from tests.conftest import FIXTURES

NOW = 1_700_000_000_000_000


def parse(*payloads: bytes | dict[str, Any] | Any) -> RowBatch:
    messages = [Message(p if isinstance(p, bytes) else json.dumps(p).encode(), f"m{i}") for i, p in enumerate(payloads)]
    return VisitParser().parse(messages, "test", NOW)


def column(batch: RowBatch, table: str, name: str) -> list[Any]:
    index = TABLES[table].index(name)
    return [row[index] for row in batch.tables[table]]


def only_reason(batch: RowBatch) -> str:
    (reason,) = column(batch, "dead_letter", "reason")
    return reason


def test_valid_visit_gives_one_row_per_visit_event_and_item(visit: Callable[..., dict[str, Any]]) -> None:
    batch = parse(visit())
    assert batch.counts() == {"visits": 1, "events": 3, "purchase_items": 1, "dead_letter": 0}


def test_rows_match_the_schema_width(visit: Callable[..., dict[str, Any]]) -> None:
    batch = parse(visit(), b"not json")
    for name, rows in batch.tables.items():
        assert all(len(row) == len(TABLES[name].columns) for row in rows), name


def test_real_sample_is_accepted_in_full() -> None:
    batch = parse((FIXTURES / "challenge_sample.jsonl").read_bytes().strip())
    assert batch.counts() == {"visits": 1, "events": 10, "purchase_items": 3, "dead_letter": 0}
    assert column(batch, "visits", "latitude") == [-45.919466]
    assert column(batch, "events", "event_type").count("page_view") == 6


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"\xff\xfe{}", "invalid_utf8"),
        (b'{"session_id": "S", ', "invalid_json"),
        (b"[1, 2]", "not_an_object"),
        (b'"just a string"', "not_an_object"),
        (b'{"user_id": "U"}', "invalid_session_id"),
        (b'{"session_id": null}', "invalid_session_id"),
        (b'{"session_id": 42}', "invalid_session_id"),
        (b'{"session_id": ""}', "invalid_session_id"),
        (b'{"session_id": "S", "events": {"a": 1}}', "invalid_events"),
        (b'{"session_id": "S", "events": null}', "invalid_events"),
    ],
)
def test_rejected_messages_give_one_dead_letter_and_nothing_else(payload: bytes, reason: str) -> None:
    batch = parse(payload)
    assert batch.counts() == {"visits": 0, "events": 0, "purchase_items": 0, "dead_letter": 1}
    assert only_reason(batch) == reason
    assert column(batch, "dead_letter", "event_index") == [None]


def test_undecodable_payload_is_kept_losslessly_as_base64() -> None:
    import base64

    batch = parse(b"\xff\xfe{}")
    (payload,) = column(batch, "dead_letter", "payload")
    assert column(batch, "dead_letter", "payload_encoding") == ["base64"]
    assert base64.b64decode(payload) == b"\xff\xfe{}"


def test_missing_events_is_a_visit_without_events() -> None:
    batch = parse({"session_id": "S"})
    assert batch.counts() == {"visits": 1, "events": 0, "purchase_items": 0, "dead_letter": 0}
    assert column(batch, "visits", "visit_start") == [None]


BAD_EVENTS: list[tuple[Any, str]] = [
    ("a string", "invalid_event"),
    ({"event": [1]}, "invalid_event"),
    ({"event_type": "hover", "timestamp": "2024-07-01T09:00:00", "details": {}}, "unknown_event_type"),
    ({"event_type": ["page_view"], "timestamp": "2024-07-01T09:00:00", "details": {}}, "unknown_event_type"),
    ({"event_type": "page_view", "details": {"page_url": "u"}}, "invalid_timestamp"),
    ({"event_type": "page_view", "timestamp": "yesterday", "details": {"page_url": "u"}}, "invalid_timestamp"),
    ({"event_type": "page_view", "timestamp": 1719824400, "details": {"page_url": "u"}}, "invalid_timestamp"),
    ({"event_type": "page_view", "timestamp": "2024-07-01T09:00:00"}, "invalid_details"),
    ({"event_type": "page_view", "timestamp": "2024-07-01T09:00:00", "details": "x"}, "invalid_details"),
    ({"event_type": "page_view", "timestamp": "2024-07-01T09:00:00", "details": {}}, "missing_page_url"),
    ({"event_type": "page_view", "timestamp": "2024-07-01T09:00:00", "details": {"page_url": 3}}, "missing_page_url"),
    ({"event_type": "add_item_to_cart", "timestamp": "2024-07-01T09:00:00", "details": {"price": 1}},
     "missing_product_id"),
    ({"event_type": "add_item_to_cart", "timestamp": "2024-07-01T09:00:00",
      "details": {"product_id": "P", "price": "9.99"}}, "invalid_price"),
    ({"event_type": "add_item_to_cart", "timestamp": "2024-07-01T09:00:00",
      "details": {"product_id": "P", "price": True}}, "invalid_price"),
    ({"event_type": "add_item_to_cart", "timestamp": "2024-07-01T09:00:00",
      "details": {"product_id": "P", "quantity": 1.5}}, "invalid_quantity"),
    ({"event_type": "add_item_to_cart", "timestamp": "2024-07-01T09:00:00",
      "details": {"product_id": "P", "quantity": False}}, "invalid_quantity"),
    ({"event_type": "add_item_to_cart", "timestamp": "2024-07-01T09:00:00",
      "details": {"product_id": "P", "quantity": 2**63}}, "invalid_quantity"),
    ({"event_type": "purchase", "timestamp": "2024-07-01T09:00:00", "details": {"amount": 3}}, "missing_order_id"),
    ({"event_type": "purchase", "timestamp": "2024-07-01T09:00:00",
      "details": {"order_id": "O", "amount": "3"}}, "invalid_amount"),
    ({"event_type": "purchase", "timestamp": "2024-07-01T09:00:00",
      "details": {"order_id": "O", "items": {"product_id": "P"}}}, "invalid_items"),
    ({"event_type": "purchase", "timestamp": "2024-07-01T09:00:00",
      "details": {"order_id": "O", "items": [{"product_id": "P"}, "x"]}}, "invalid_items"),
    ({"event_type": "purchase", "timestamp": "2024-07-01T09:00:00",
      "details": {"order_id": "O", "items": [{"product_id": "P", "price": "free"}]}}, "invalid_items"),
]  # fmt: skip


@pytest.mark.parametrize(("event", "reason"), BAD_EVENTS)
def test_rejected_event_is_dead_lettered_and_the_rest_of_the_visit_kept(
    visit: Callable[..., dict[str, Any]], event: Any, reason: str
) -> None:
    good = visit()["events"]
    batch = parse(visit(events=[good[0], event, good[1]]))
    assert batch.counts() == {"visits": 1, "events": 2, "purchase_items": 0, "dead_letter": 1}
    assert only_reason(batch) == reason
    assert column(batch, "dead_letter", "event_index") == [1]
    assert column(batch, "events", "event_index") == [0, 2]
    assert column(batch, "visits", "event_count") == [2]
    assert column(batch, "visits", "rejected_event_count") == [1]
    assert json.loads(column(batch, "dead_letter", "payload")[0]) == event


def test_wrapped_and_bare_events_are_both_accepted(visit: Callable[..., dict[str, Any]]) -> None:
    bare = visit()
    wrapped = visit(events=[{"event": e} for e in bare["events"]])
    mixed = visit(events=[bare["events"][0], {"event": bare["events"][1]}])
    assert parse(bare).counts()["events"] == 3
    assert parse(wrapped).counts()["events"] == 3
    assert parse(mixed).counts()["events"] == 2


def test_a_batch_may_switch_between_wrapped_and_bare_visits(visit: Callable[..., dict[str, Any]]) -> None:
    bare = visit()
    wrapped = visit(events=[{"event": e} for e in bare["events"]])
    messages = [Message(json.dumps(v).encode(), f"m{i}") for i, v in enumerate([wrapped, bare, bare, wrapped, bare])]
    parser = VisitParser()
    together = parser.parse(messages, "test", NOW)
    one_by_one = RowBatch()
    for message in messages:
        one_by_one.add(VisitParser().parse([message], "test", NOW))
    assert together == one_by_one
    assert together.counts() == {"visits": 5, "events": 15, "purchase_items": 5, "dead_letter": 0}
    assert parser._decoders[0] is fastpath.bare_decoder  # the next batch tries the latest format first


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-07-01T09:00:00", "2024-07-01T09:00:00+00:00"),
        ("2024-07-01T09:00:00Z", "2024-07-01T09:00:00+00:00"),
        ("2024-07-01T11:00:00+02:00", "2024-07-01T09:00:00+00:00"),
        ("2024-07-01T09:00:00.250Z", "2024-07-01T09:00:00.250000+00:00"),
        ("2024-07-01T04:00:00.123456-05:00", "2024-07-01T09:00:00.123456+00:00"),
    ],
)
def test_timestamps_are_stored_in_utc(text: str, expected: str) -> None:
    from datetime import UTC, datetime

    assert parse_timestamp_us(text) == int(datetime.fromisoformat(expected).timestamp() * 1_000_000)
    assert datetime.fromtimestamp(parse_timestamp_us(text) / 1e6, UTC) == datetime.fromisoformat(expected)


@pytest.mark.parametrize("details", [{"page_url": "u"}, {"page_url": "u", "referrer_url": None},
                                     {"page_url": "u", "referrer_url": ""}])  # fmt: skip
def test_absent_null_or_empty_referrer_is_null(visit: Callable[..., dict[str, Any]], details: dict[str, Any]) -> None:
    event = {"event_type": "page_view", "timestamp": "2024-07-01T09:00:00", "details": details}
    assert column(parse(visit(events=[event])), "events", "referrer_url") == [None]


@pytest.mark.parametrize("geolocation", ["somewhere", "1,2,3", "91,0", "0,181", None, 5, "nan,nan"])
def test_unusable_geolocation_gives_null_coordinates(visit: Callable[..., dict[str, Any]], geolocation: Any) -> None:
    batch = parse(visit(geolocation=geolocation))
    assert column(batch, "visits", "latitude") == [None]
    assert column(batch, "visits", "longitude") == [None]
    assert batch.counts()["dead_letter"] == 0


def test_unknown_fields_are_ignored(visit: Callable[..., dict[str, Any]]) -> None:
    noisy = visit(tracking={"a": 1})
    noisy["events"][0]["extra"] = True
    noisy["events"][0]["details"]["utm"] = "x"
    assert parse(noisy).counts() == parse(visit()).counts()


def test_visit_bounds_and_counts(visit: Callable[..., dict[str, Any]]) -> None:
    batch = parse(visit())
    (start,), (end,) = column(batch, "visits", "visit_start"), column(batch, "visits", "visit_end")
    assert start == parse_timestamp_us("2024-07-01T09:00:00Z")
    assert end == parse_timestamp_us("2024-07-01T09:00:10Z")


def test_ids_are_deterministic_per_message_id(visit: Callable[..., dict[str, Any]]) -> None:
    data = json.dumps(visit()).encode()
    first = VisitParser().parse([Message(data, "topic/123")], "a", NOW)
    again = VisitParser().parse([Message(data, "topic/123")], "b", NOW + 5)
    other = VisitParser().parse([Message(data, "topic/124")], "a", NOW)
    assert column(first, "events", "event_id") == column(again, "events", "event_id")
    assert column(first, "events", "event_id") != column(other, "events", "event_id")
    assert column(first, "visits", "visit_id") == [visit_id_for("topic/123")]


def test_same_session_id_in_two_messages_gives_distinct_ids(visit: Callable[..., dict[str, Any]]) -> None:
    batch = parse(visit(), visit())
    assert len(set(column(batch, "events", "event_id"))) == 6


def test_purchase_items_carry_the_order(visit: Callable[..., dict[str, Any]]) -> None:
    batch = parse(visit())
    assert column(batch, "purchase_items", "order_id") == ["O-1"]
    assert column(batch, "purchase_items", "quantity") == [2]
    assert column(batch, "purchase_items", "price") == [29.99]


def test_ingested_at_and_source_come_from_the_metadata(visit: Callable[..., dict[str, Any]]) -> None:
    batch = VisitParser().parse([Message(msgspec.json.encode(visit()), "m")], "my-source", NOW)
    assert column(batch, "visits", "source") == ["my-source"]
    assert set(column(batch, "events", "ingested_at")) == {NOW}
