"""The parser against hostile input: deep nesting, broken encodings, huge messages, fuzzed bytes.

The invariant everywhere: ``parse`` never raises; every message yields one ``visits`` row or one
message-level dead letter; for every visit, its accepted events plus its event-level dead letters
are exactly the events it carried; and every row encodes to JSON (what every sink does first).
"""

from __future__ import annotations

import collections
import hashlib
import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clickflow.api import Message, RowBatch
from clickflow.parser import MAX_INVALID_EVENTS, MAX_MESSAGE_ID_CHARS, MAX_ROWS, VisitParser
from clickflow.rejections import OVERSIZED_PAYLOAD_BYTES, kept_text
from clickflow.schema import DeadLetterCol, EventCol, VisitCol
from clickflow_simulator.generator import VisitGenerator
from tests.conftest import VALID_VISIT
from tests.test_parser_properties import messages as shaped_messages

HERE = Path(__file__).resolve().parent
MUTATED_INPUTS = 20_000
SESSION = b'{"session_id":"s","events":'


def parse(payloads: list[bytes], parser: VisitParser | None = None) -> RowBatch:
    return (parser or VisitParser()).parse([Message(p, f"m{i}") for i, p in enumerate(payloads)], "fuzz", 0)


def check_accounted_for(payloads: list[bytes], batch: RowBatch) -> None:
    """The parser contract, for any input whatever."""
    dead = batch.tables["dead_letter"]
    whole = [row for row in dead if row[4] is None]
    assert len(batch.tables["visits"]) + len(whole) == len(payloads)
    events_by_visit: dict[str, int] = {}
    for row in batch.tables["events"]:
        events_by_visit[row[1]] = events_by_visit.get(row[1], 0) + 1
    dead_by_visit: dict[str, int] = {}
    for row in dead:
        if row[4] is not None:
            visit_id = row[0].partition(":")[0]
            dead_by_visit[visit_id] = dead_by_visit.get(visit_id, 0) + 1
    for visit in batch.tables["visits"]:
        assert (events_by_visit.get(visit[0], 0), dead_by_visit.get(visit[0], 0)) == (visit[9], visit[10])
        declared = _declared_events(payloads[int(visit[12][1:])])
        if declared is not None:
            assert visit[9] + visit[10] == declared
    for rows in batch.tables.values():
        msgspec.json.Encoder().encode_lines(rows)  # a sink's first step: must not raise


def _declared_events(payload: bytes) -> int | None:
    try:
        events = json.loads(payload).get("events", [])
    except (ValueError, RecursionError, AttributeError):
        return None
    return len(events) if isinstance(events, list) else None


@pytest.mark.parametrize(
    "payload",
    [
        SESSION + b"[" * 1000 + b"]" * 1000 + b"}",
        SESSION + b"[" * 100_000,
        SESSION + b"[" + b'{"a":' * 5000 + b"1" + b"}" * 5000 + b"]}",
        b'{"session_id":"s","events":[{"event_type":"page_view","x":' + b"[" * 3000 + b"]" * 3000 + b"}]}",
    ],
    ids=["nested lists", "unclosed lists", "nested objects", "deep inside an event"],
)
def test_deep_nesting_is_a_too_deep_dead_letter(payload: bytes) -> None:
    batch = parse([payload])
    assert batch.counts() == {"visits": 0, "events": 0, "purchase_items": 0, "dead_letter": 1}
    assert batch.tables["dead_letter"][0][5] == "too_deep"


@pytest.mark.parametrize("where", ["key", "value", "event key"])
def test_invalid_utf8_anywhere_is_an_invalid_utf8_dead_letter(where: str) -> None:
    good = msgspec.json.encode(VALID_VISIT)
    payload = {
        "key": good.replace(b'"user_agent"', b'"\xff\xfe"', 1),
        "value": good.replace(b"Mozilla", b"Mo\xc3\x28illa", 1),
        "event key": good.replace(b'"referrer_url"', b'"ref\xe9"', 1),
    }[where]
    batch = parse([payload])
    assert [row[5] for row in batch.tables["dead_letter"]] == ["invalid_utf8"]
    assert batch.tables["dead_letter"][0][8] == "base64"
    assert batch.counts()["visits"] == 0


def test_a_message_over_the_limit_keeps_its_head_size_and_hash() -> None:
    payload = b'{"session_id":"s","user_agent":"' + b"x" * (11 * 1024 * 1024) + b'"}'
    (row,) = parse([payload]).tables["dead_letter"]
    assert row[5] == "too_large"
    assert f"message is {len(payload)} bytes" in row[6]
    assert hashlib.sha256(payload).hexdigest() in row[6]
    assert row[7] == payload[:OVERSIZED_PAYLOAD_BYTES].decode()


def test_the_message_limit_is_the_parsers_option() -> None:
    small = VisitParser(max_message_bytes=100)
    assert parse([msgspec.json.encode(VALID_VISIT)], small).tables["dead_letter"][0][5] == "too_large"
    assert parse([b'{"session_id": "s"}'], small).counts()["visits"] == 1


def test_a_large_rejected_payload_is_kept_in_base64_so_its_row_stays_short() -> None:
    payload = b'{"session_id": 1, "x": "' + b'\\"' * (600 * 1024) + b'"}'  # escapes double its JSON text
    (row,) = parse([payload]).tables["dead_letter"]
    assert (row[5], row[8]) == ("invalid_session_id", "base64")
    assert len(msgspec.json.encode(row)) < 2 * len(payload)


@pytest.mark.parametrize(
    "number", [b"1e999", b"-1e999", b"1" * 400, b"NaN", b"Infinity", b"1e-999", b"9223372036854775808"]
)
def test_huge_and_non_finite_numbers_are_refused_or_kept_never_raised(number: bytes) -> None:
    payload = (
        msgspec.json.encode(VALID_VISIT)
        .replace(b"29.99", number, 1)
        .replace(b'"quantity":2', b'"quantity":' + number, 1)
    )
    check_accounted_for([payload], parse([payload]))


def test_many_events_and_long_strings_within_the_limit_are_kept() -> None:
    event = {"event_type": "page_view", "timestamp": "2024-07-01T09:00:00", "details": {"page_url": "u" * 400}}
    payload = msgspec.json.encode({"session_id": "s", "events": [event] * 20_000})
    batch = parse([payload])
    assert batch.counts()["events"] == 20_000
    check_accounted_for([payload], batch)


@pytest.mark.parametrize("field", ["session_id", "user_id", "device_type", "order_id"])
def test_a_long_field_every_row_repeats_is_a_dead_letter_not_a_multiplied_message(field: str) -> None:
    """A 390 KB visit of 2,000 events whose session_id was 200 KB made 400 MB of event rows (at 10
    MB, hundreds of gigabytes: memory and disk gone for one message)."""
    long = "x" * 200_000
    purchase = {"event_type": "purchase", "timestamp": "2024-07-01T09:00:00", "details": {"order_id": "O-1"}}
    items = [{"product_id": f"P-{i}"} for i in range(2000)]
    view = {"event_type": "page_view", "timestamp": "2024-07-01T09:00:00", "details": {"page_url": "u"}}
    if field == "order_id":
        visit = {"session_id": "s", "events": [view, {**purchase, "details": {"order_id": long, "items": items}}]}
    else:
        visit = {"session_id": "s", field: long, "events": [view] * 2000}
    payload = msgspec.json.encode(visit)
    batch = parse([payload])
    check_accounted_for([payload], batch)
    (dead,) = batch.tables["dead_letter"]
    assert dead[DeadLetterCol.reason] == "field_too_long"
    assert f"{field} is 200,000 characters, over 256" in dead[DeadLetterCol.error]
    encoded = sum(len(msgspec.json.encode(rows)) for rows in batch.tables.values())
    assert encoded < 3 * len(payload)
    assert batch.counts()["visits"] == (1 if field == "order_id" else 0)


def test_a_visit_of_more_invalid_events_than_the_limit_is_one_dead_letter_not_one_each() -> None:
    """Each invalid event is a dead letter of about 190 bytes, even ``{}``: a 1 MB message of them
    made 62 MB of rows, and one of 10 MB took 1.7 GB of memory."""
    view = b'{"event_type":"page_view","timestamp":"2024-07-01T09:00:00","details":{"page_url":"u"}}'
    at_limit = b'{"session_id":"s","events":[' + b",".join([view] * 5 + [b"{}"] * MAX_INVALID_EVENTS) + b"]}"
    flood = b'{"session_id":"s","events":[' + b",".join([view] * 5 + [b"{}"] * 40_000) + b"]}"
    batch = parse([at_limit, flood])
    check_accounted_for([at_limit, flood], batch)
    (visit,) = batch.tables["visits"]
    assert (visit[VisitCol.event_count], visit[VisitCol.rejected_event_count]) == (5, MAX_INVALID_EVENTS)
    whole = [row for row in batch.tables["dead_letter"] if row[DeadLetterCol.event_index] is None]
    assert [(row[DeadLetterCol.reason], row[DeadLetterCol.message_id]) for row in whole] == [
        ("too_many_invalid_events", "m1")
    ]
    assert "more than 1,000 of its 40,005 events are invalid" in whole[0][DeadLetterCol.error]
    assert batch.counts() == {"visits": 1, "events": 5, "purchase_items": 0, "dead_letter": MAX_INVALID_EVENTS + 1}
    assert len(msgspec.json.encode(batch.tables["dead_letter"])) < 3 * len(flood)


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "wrapped"])
def test_a_visit_of_more_events_and_items_than_the_limit_is_one_dead_letter_not_a_multiplied_message(
    wrapped: bool,
) -> None:
    """A purchase item of 18 bytes is a row of about 250 bytes in memory: a 10 MB message of 550,000
    of them took 250 MB, and four such push requests at once 1.13 GB."""
    view = {"event_type": "page_view", "timestamp": "2024-07-01T09:00:00", "details": {"page_url": "u"}}
    purchase = {**view, "event_type": "purchase", "details": {"order_id": "O", "items": [{"product_id": "p"}]}}

    def visit(*events: dict[str, Any]) -> bytes:
        return msgspec.json.encode({"session_id": "s", "events": [{"event": e} if wrapped else e for e in events]})

    def with_items(count: int) -> dict[str, Any]:
        return {**purchase, "details": {"order_id": "O", "items": [{"product_id": "p"}] * count}}

    at_limit = visit(view, with_items(MAX_ROWS - 4), purchase)  # rows: 3 events and MAX_ROWS - 3 items
    payloads = [
        at_limit,
        visit(view, with_items(MAX_ROWS - 3), purchase),  # one row over, counted across purchases
        visit(*[view] * (MAX_ROWS + 1)),
        visit(*[view] * MAX_ROWS, {**view, "event_type": "scroll"}),  # to the reference rules, as any unknown event
        visit({**view, "timestamp": "yesterday"}, with_items(MAX_ROWS)),
    ]
    batch = parse(payloads)
    check_accounted_for(payloads, batch)
    (stored,) = batch.tables["visits"]
    assert (stored[VisitCol.message_id], stored[VisitCol.event_count]) == ("m0", 3)
    assert batch.counts() == {"visits": 1, "events": 3, "purchase_items": MAX_ROWS - 3, "dead_letter": 4}
    dead = batch.tables["dead_letter"]
    assert {row[DeadLetterCol.reason] for row in dead} == {"too_many_rows"}
    assert [row[DeadLetterCol.error] for row in dead] == [
        "its events (3) and purchase items (49,998) are more than 50,000 rows",
        "its 50,001 events are more than 50,000 rows",
        "its 50,001 events are more than 50,000 rows",
        "its events (2) and purchase items (50,000) are more than 50,000 rows",
    ]
    kept = [(row[DeadLetterCol.payload], row[DeadLetterCol.payload_encoding]) for row in dead]
    assert kept == [kept_text(p) for p in payloads[1:]]  # each message whole


def test_a_message_id_over_the_limit_is_stored_as_its_digest_in_every_row() -> None:
    """A push request of 1.1 MB whose ``messageId`` was 1 MB, with a thousand invalid events, made a
    thousand dead letters that each held the id: a gigabyte of rows, 1.25 GB of memory, and no answer
    within 28 s. An id the parser must bound comes from whoever sends the push request."""
    view = {"event_type": "page_view", "timestamp": "2024-07-01T09:00:00", "details": {"page_url": "u"}}
    payload = msgspec.json.encode({"session_id": "s", "events": [view, *[{**view, "timestamp": "yesterday"}] * 999]})
    long_id, at_limit = "m" * 1_000_000, "n" * MAX_MESSAGE_ID_CHARS
    parser = VisitParser()
    batch = parser.parse([Message(payload, long_id), Message(payload, at_limit)], "push", 0)
    digest = "sha256:" + hashlib.sha256(long_id.encode()).hexdigest()[:32]
    (first, second) = batch.tables["visits"]
    assert (first[VisitCol.message_id], second[VisitCol.message_id]) == (digest, at_limit)
    assert (first[VisitCol.event_count], first[VisitCol.rejected_event_count]) == (1, 999)
    ids = collections.Counter(row[DeadLetterCol.message_id] for row in batch.tables["dead_letter"])
    assert ids == {digest: 999, at_limit: 999}
    of_long_id = [row for row in batch.tables["dead_letter"] if row[DeadLetterCol.message_id] == digest]
    assert len(msgspec.json.encode(of_long_id)) < 5 * len(payload)
    again = parser.parse([Message(payload, long_id)], "push", 0)  # a redelivery: the same visit
    assert again.tables["visits"][0][VisitCol.visit_id] == first[VisitCol.visit_id]
    unwritable = parser.unwritable(Message(payload, long_id), "push", 0, "no sink could store it")
    assert unwritable.tables["dead_letter"][0][DeadLetterCol.message_id] == digest


def test_huge_page_urls_and_timestamps_are_stored_whole_and_not_kept_after_their_batch() -> None:
    """The parser caches URLs and timestamp texts between batches, for their repeats: a stream of
    unique megabyte-long ones must leave nothing behind once their rows are gone."""
    import tracemalloc

    parser = VisitParser()
    parse([msgspec.json.encode(VALID_VISIT)], parser)  # the caches and decoders warm, before measuring
    long_time = "2024-07-01T09:00:00." + "1" * 100_000

    def visit(i: int) -> bytes:
        url = f"https://e.com/{i}/" + "a" * 100_000
        event = {"event_type": "page_view", "timestamp": f"{long_time}{i}", "details": {"page_url": url}}
        return msgspec.json.encode({"session_id": f"s{i}", "events": [event, event]})

    tracemalloc.start()
    try:
        for start in range(0, 200, 50):
            payloads = [visit(i) for i in range(start, start + 50)]
            batch = parse(payloads, parser)
            check_accounted_for(payloads, batch)
            urls = [row[EventCol.page_url] for row in batch.tables["events"]]
            assert len(urls) == 100 and all(len(url) > 100_000 for url in urls)
            assert {row[EventCol.event_timestamp] for row in batch.tables["events"]} == {1719824400_111111}
            del payloads, batch, urls
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 2_000_000  # 200 URLs and 200 timestamps of 100 KB each would be 40 MB


def _mutations(seed: int, count: int) -> list[bytes]:
    """Realistic visits damaged the ways real and hostile streams are: flipped, cut, nested, re-encoded."""
    rng = random.Random(seed)
    visits = list(VisitGenerator(seed=seed, malformed_rate=0.0).messages(200))
    hostile = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00", b"\\ud800", b'"', b"[" * 600, b"{", b"1e999", b"-0", b"\\"]
    out = []
    for _ in range(count):
        data = bytearray(rng.choice(visits))
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data) + 1)
            action = rng.randrange(5)
            if action == 0:
                data[at:at] = rng.choice(hostile)
            elif action == 1 and data:
                data[rng.randrange(len(data))] = rng.randrange(256)
            elif action == 2:
                del data[at:]
            elif action == 3:
                data[at:at] = b"[" * rng.randint(1, 2000)
            else:
                data[at:at] = rng.choice(visits)
        out.append(bytes(data))
    return out


def test_twenty_thousand_mutated_visits_are_all_accounted_for() -> None:
    payloads = _mutations(seed=13, count=MUTATED_INPUTS)
    parser = VisitParser()
    for start in range(0, len(payloads), 500):
        chunk = payloads[start : start + 500]
        check_accounted_for(chunk, parse(chunk, parser))


hostile_bytes = st.one_of(
    st.binary(max_size=200),
    shaped_messages,
    st.integers(1, 3000).map(lambda depth: SESSION + b"[" * depth + b"]" * depth + b"}"),
    st.tuples(shaped_messages, st.binary(min_size=1, max_size=4), st.integers(0, 400)).map(
        lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
    ),
    st.text(max_size=50).map(lambda s: b'{"session_id":"' + s.encode("utf-8", "surrogatepass") + b'"}'),
)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large], deadline=None)
@given(st.lists(hostile_bytes, min_size=1, max_size=10))
def test_hostile_bytes_never_raise_and_are_all_accounted_for(payloads: list[bytes]) -> None:
    check_accounted_for(payloads, parse(payloads))


@pytest.mark.timeout(240)
def test_coverage_guided_fuzzing_finds_no_crash(tmp_path: Path) -> None:
    """atheris (libFuzzer) mutates inputs towards new branches of the parser; any exception fails it."""
    runs = 30_000
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for index, seed in enumerate(VisitGenerator(seed=3, malformed_rate=0.2).messages(20)):
        (corpus / f"seed-{index}").write_bytes(seed)
    result = subprocess.run(
        [sys.executable, str(HERE / "fuzz_parser.py"), f"-runs={runs}", "-max_len=4096", "-seed=7",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=230, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"Done {runs} runs" in result.stderr
