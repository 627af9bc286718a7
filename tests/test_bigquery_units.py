"""The BigQuery sinks' pure parts: request splitting, answers, ids, schemas, quota."""

from __future__ import annotations

import importlib.util
import json
import re
import time

import anyio
import pytest

from clickflow.api import Message
from clickflow.options import OptionsError, validate_options
from clickflow.parser import VisitParser
from clickflow.schema import EVENTS, TABLES, VISITS
from clickflow_bigquery.client import BigQueryError
from clickflow_bigquery.load import LoadBatch, TableFile
from clickflow_bigquery.quota import JobBudget
from clickflow_bigquery.rows import ROW_IDS, encode_row, error_locations, timestamp
from clickflow_bigquery.streaming import (
    BigQueryStreamingOptions,
    EncodedRows,
    InsertBatch,
    _encoded,
    request_body,
    requests,
    settle,
)
from clickflow_bigquery.tables import ensure_dataset, schema_differences, table_resource
from tests.conftest import VALID_VISIT


def parsed(count: int, now: int = 1_719_824_400_000_000):  # type: ignore[no-untyped-def]
    messages = [Message(json.dumps(VALID_VISIT).encode(), f"m{i}") for i in range(count)]
    return VisitParser().parse(messages, "test", now)


def rows(count: int, size: int = 10) -> list[EncodedRows]:
    return [_encoded(f"k{i}", json.dumps({"x": "y" * size}).encode()) for i in range(count)]


def test_requests_respect_the_row_limit_and_the_exact_body_size() -> None:
    encoded = rows(1234, size=300)
    chunks = list(requests(encoded, max_rows=500, max_bytes=64 * 1024))
    assert [row for chunk in chunks for row in chunk] == encoded  # all, in order, once
    for chunk in chunks:
        assert len(chunk) <= 500
        assert len(request_body(chunk)) <= 64 * 1024
    assert len(request_body(chunks[0]) + request_body(chunks[0][:1])) > 64 * 1024  # chunks are full
    assert max(len(chunk) for chunk in list(requests(encoded, 500, 9 * 1024 * 1024))) == 500


def test_a_row_too_big_for_any_request_is_an_error_not_a_silent_drop() -> None:
    with pytest.raises(ValueError, match="alone are over"):
        list(requests(rows(1, size=70_000), max_rows=500, max_bytes=64 * 1024))


def test_request_bodies_are_valid_json_with_insert_ids() -> None:
    body = json.loads(request_body(rows(3)))
    assert body["skipInvalidRows"] is True
    assert [r["insertId"] for r in body["rows"]] == ["k0", "k1", "k2"]
    assert body["rows"][0]["json"] == {"x": "y" * 10}


def test_a_rows_json_is_recovered_from_its_request_item_whatever_its_key() -> None:
    for key in ("k1", 'tricky","json":{"x":1}', "é:3"):
        row = _encoded(key, b'{"a":"b,\\"json\\":c"}')
        assert row.json == b'{"a":"b,\\"json\\":c"}'
        assert row.key == key
        assert json.loads(row.text) == {"insertId": key, "json": {"a": 'b,"json":c'}}


def test_insert_ids_are_the_rows_keys_whatever_the_ingestion_time() -> None:
    first, second = InsertBatch(), InsertBatch()
    first.add(parsed(3, now=1))
    second.add(parsed(3, now=2))
    for table in TABLES:
        assert [r.key for e in first.pending[table] for r in e.rows()] == [
            r.key for e in second.pending[table] for r in e.rows()
        ]
    events = [row for encoded in first.pending["events"] for row in encoded.rows()]
    assert events[0].key == json.loads(events[0].json)["event_id"]
    assert [json.loads(r.text)["insertId"] for r in events] == [r.key for r in events]
    assert len({r.key for r in events}) == len(events) == len(parsed(3).tables["events"])


def test_answers_sort_rows_into_confirmed_again_and_refused() -> None:
    sent = rows(5)
    answer = {
        "insertErrors": [
            {"index": 1, "errors": [{"reason": "invalid", "message": "no such field", "location": "x"}]},
            {"index": 2, "errors": [{"reason": "stopped", "message": ""}]},
            {"index": 4, "errors": [{"reason": "backendError", "message": "try again"}]},
        ]
    }
    outcome = settle(sent, answer)
    assert outcome.confirmed == 2
    assert outcome.again == [sent[2], sent[4]]
    assert [(row, "invalid" in why) for row, why in outcome.refused] == [(sent[1], True)]
    assert settle(sent, {}).confirmed == 5


def test_rows_are_encoded_a_request_at_most_at_a_time_and_split_back_exactly() -> None:
    rows_ = parsed(5)
    tricky = list(rows_.tables["visits"][1])
    tricky[6] = ',{"insertId":"forged","json":{}},{"insertId":'  # a user agent that looks like a row's start
    rows_.tables["visits"][1] = tuple(tricky)
    batch = InsertBatch(max_rows=7)
    batch.add(rows_)
    for table, table_rows in rows_.tables.items():
        pieces = batch.pending[table]
        assert all(1 <= piece.count <= 7 for piece in pieces)
        split = [row for piece in pieces for row in piece.rows()]
        assert [row.json for row in split] == [encode_row(table, row) for row in table_rows]
        assert [row.key for row in split] == [ROW_IDS[table](row) for row in table_rows]
        assert b",".join(row.text for row in split) == b",".join(piece.text for piece in pieces)
    assert batch.counts() == rows_.counts() and len(batch) == len(rows_)
    assert json.loads(batch.pending["visits"][0].rows()[1].json)["user_agent"] == tricky[6]


def test_requests_take_whole_pieces_up_to_the_row_limit() -> None:
    batch = InsertBatch(max_rows=3)
    batch.add(parsed(4))
    pieces = batch.pending["events"]
    chunks = list(requests(pieces, max_rows=7, max_bytes=9 * 1024 * 1024))
    assert [piece for chunk in chunks for piece in chunk] == pieces
    assert all(sum(piece.count for piece in chunk) <= 7 for chunk in chunks)
    assert [sum(piece.count for piece in chunk) for chunk in chunks][:-1] == [6] * (len(chunks) - 1)
    body = json.loads(request_body(chunks[0]))
    assert [row["insertId"] for row in body["rows"]] == [row.key for piece in chunks[0] for row in piece.rows()]


def test_an_answer_names_rows_by_their_index_across_the_pieces_of_a_request() -> None:
    batch = InsertBatch(max_rows=3)
    batch.add(parsed(2))
    (chunk,) = requests(batch.pending["events"], max_rows=500, max_bytes=9 * 1024 * 1024)
    assert len(chunk) > 1
    sent = [row for piece in chunk for row in piece.rows()]
    answer = {
        "insertErrors": [
            {"index": 1, "errors": [{"reason": "invalid", "message": "no such field"}]},
            {"index": 4, "errors": [{"reason": "stopped", "message": ""}]},
        ]
    }
    outcome = settle(chunk, answer)
    assert outcome.confirmed == len(sent) - 2
    assert outcome.again == [sent[4]]
    assert [row.key for row, _ in outcome.refused] == [sent[1].key]
    assert settle(chunk, {}).confirmed == len(sent) and settle(chunk, {}).again == []


def test_timestamps_are_utc_strings_exact_to_the_microsecond() -> None:
    assert timestamp(1_719_824_400_123_456) == "2024-07-01T09:00:00.123456Z"
    assert timestamp(-1) == "1969-12-31T23:59:59.999999Z"
    assert timestamp(-62_135_596_800_000_000) == "0001-01-01T00:00:00Z"
    assert timestamp(253_402_300_799_999_999) == "9999-12-31T23:59:59.999999Z"
    row = json.loads(encode_row("visits", parsed(1).tables["visits"][0]))
    assert row["visit_start"] == "2024-07-01T09:00:00Z"
    assert row["visit_id"] == ROW_IDS["visits"](parsed(1).tables["visits"][0])


def test_load_job_ids_depend_on_destination_and_row_keys_only(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def job_id(now: int, destination: str = "p.d.events", count: int = 3) -> str:
        batch = LoadBatch(str(tmp_path))
        batch.add(parsed(count, now=now))
        batch.discard()
        return batch.files["events"].job_id(destination, 0)

    assert job_id(1) == job_id(2)
    assert job_id(1) != job_id(1, destination="p.d.other")
    assert job_id(1) != job_id(1, count=2)
    assert job_id(1).startswith("clickflow_events_") and job_id(1).endswith("_0")


def test_taking_rows_out_by_byte_position_or_line_keeps_the_rest(tmp_path) -> None:  # type: ignore[no-untyped-def]
    table_file = TableFile(str(tmp_path), "events")
    table_file.add(parsed(2).tables["events"])
    table_file.close()
    lines = (tmp_path / "events.json").read_bytes().splitlines()
    taken = table_file.take({len(lines[0]) + 1}, {4})  # the second row by its byte position, the fourth by its line
    assert [line for _, line in taken] == [lines[1], lines[3]]
    assert taken[0][0] == json.loads(lines[1])["event_id"]
    assert (tmp_path / "events.json").read_bytes().splitlines() == [lines[0], lines[2], *lines[4:]]
    assert len(table_file) == len(lines) - 2


def test_error_messages_name_rows_by_position_or_line() -> None:
    bigquery = [{"message": "Error while reading data, error message: JSON parsing error in row starting at "
                            "position 1234: No such field: x."}]  # fmt: skip
    emulator = [{"message": 'JSON transform error in file "/tmp/f.bin", in line 5: Failed to cast'}]
    assert error_locations(bigquery) == ({1234}, set())
    assert error_locations(emulator) == (set(), {5})
    assert error_locations([{"message": "Access Denied"}]) == (set(), set())


def test_tables_are_partitioned_and_clustered_for_the_dashboards() -> None:
    events = table_resource(EVENTS)
    assert events["timePartitioning"] == {"type": "DAY", "field": "event_timestamp"}
    assert events["clustering"] == {"fields": ["event_type", "page_url"]}
    assert [f["name"] for f in events["schema"]["fields"]] == list(EVENTS.column_names)
    assert schema_differences(EVENTS, events) == []


def test_schema_differences_are_listed_clearly() -> None:
    found = table_resource(VISITS)
    fields = {f["name"]: f for f in found["schema"]["fields"]}
    fields["session_id"]["type"] = "INT64"
    fields["latitude"]["type"] = "FLOAT64"  # the same type as FLOAT: fine
    fields["event_count"]["mode"] = "NULLABLE"  # looser than clickflow's: fine
    fields["user_agent"]["mode"] = "REQUIRED"
    del fields["user_id"]
    fields["extra"] = {"name": "extra", "type": "STRING", "mode": "REQUIRED"}
    found["schema"]["fields"] = list(fields.values())
    assert schema_differences(VISITS, found) == [
        "column user_id is missing",
        "column session_id is INT64, clickflow writes STRING",
        "column user_agent is REQUIRED, clickflow writes NULLABLE",
        "column extra is REQUIRED but clickflow does not write it",
    ]


def test_options_refuse_unknown_tables_and_oversized_requests() -> None:
    with pytest.raises(OptionsError, match="unknown table"):
        validate_options(BigQueryStreamingOptions, {"project": "p", "dataset": "d", "tables": {"hits": "x"}})
    with pytest.raises(OptionsError, match="max_rows_per_request"):
        validate_options(BigQueryStreamingOptions, {"project": "p", "dataset": "d", "max_rows_per_request": 501})
    options = BigQueryStreamingOptions(project="p", dataset="d", table_prefix="web_", tables={"events": "hits"})
    names = options.table_names()
    assert names == {"visits": "web_visits", "events": "hits", "purchase_items": "web_purchase_items",
                     "dead_letter": "web_dead_letter"}  # fmt: skip


@pytest.mark.parametrize(
    ("tables", "refused"),
    [
        ({"events": "page hits-2024"}, None),  # spaces and dashes: BigQuery takes them
        ({"events": "таблица_событий"}, None),
        ({"events": "web.hits"}, "tables: events would be written to 'web.hits', which BigQuery does not take"),
        ({"events": "a/b"}, "tables: events would be written to 'a/b'"),
        ({"events": ""}, "tables: events would be written to ''"),
        ({"events": "x" * 1025}, "which BigQuery does not take for a table's name"),
        ({"events": "visits"}, "tables: visits and events would both be written to 'visits'"),
        ({"visits": "all", "dead_letter": "all"}, "tables: visits and dead_letter would both be written to 'all'"),
    ],
)
def test_options_refuse_table_names_bigquery_would_refuse_or_that_two_tables_share(
    tables: dict[str, str], refused: str | None
) -> None:
    options = {"project": "p", "dataset": "d", "tables": tables}
    if refused is None:
        assert validate_options(BigQueryStreamingOptions, options).table_names()["events"] == tables["events"]
    else:
        with pytest.raises(OptionsError, match=re.escape(refused)):
            validate_options(BigQueryStreamingOptions, options)


def test_arrow_rows_without_pyarrow_are_refused_when_the_pipeline_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    from clickflow_bigquery.write import BigQueryWriteOptions

    options = {"project": "p", "dataset": "d", "row_format": "arrow"}
    assert validate_options(BigQueryWriteOptions, options).row_format == "arrow"  # the dev install has pyarrow
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pyarrow" else real(name, *a))
    with pytest.raises(OptionsError, match=r"row_format: arrow needs pyarrow, which is not installed"):
        validate_options(BigQueryWriteOptions, options)


def test_the_job_budget_allows_a_burst_then_spaces_jobs() -> None:
    async def main() -> list[float]:
        budget = JobBudget(per_day=86_400 * 20, burst=3)  # 20 jobs a second after a burst of 3
        started = []
        for _ in range(5):
            await budget.take("t")
            started.append(time.monotonic())
        return started

    started = anyio.run(main)
    assert started[2] - started[0] < 0.02
    assert started[4] - started[2] >= 0.09


def test_a_row_too_large_for_any_request_becomes_a_too_large_dead_letter() -> None:
    batch = InsertBatch(max_item_bytes=2000, sink="bq")
    rows = parsed(2)
    big = list(rows.tables["visits"][0])
    big[6] = "u" * 5000  # the user agent
    rows.tables["visits"][0] = tuple(big)
    batch.add(rows)
    assert len(batch.pending["visits"]) == 1
    (dead,) = [json.loads(r.json) for r in batch.pending["dead_letter"]]
    assert dead["reason"] == "too_large" and dead["source"] == "bq"
    assert dead["dead_letter_id"] == f"visits/{big[0]}"
    assert "over max_request_bytes" in dead["error"] and len(dead["payload"]) <= 64 * 1024
    assert all(len(r.text) <= 2000 for rows_ in batch.pending.values() for r in rows_)


class DatasetRights:
    """BigQuery as seen by a service account with roles on one dataset only: it may read that
    dataset, and any attempt to create a dataset is refused (403)."""

    project = "p"

    def __init__(self, existing: set[str]) -> None:
        self.existing = existing
        self.created: list[str] = []

    async def get_dataset(self, dataset: str) -> dict[str, str]:
        if dataset not in self.existing:
            raise BigQueryError(404, "notFound", f"Dataset p:{dataset} not found")
        return {"id": f"p:{dataset}"}

    async def create_dataset(self, dataset: str) -> None:
        if dataset in self.existing:
            raise BigQueryError(403, "accessDenied", "User does not have bigquery.datasets.create permission")
        self.created.append(dataset)


def test_an_existing_dataset_is_not_created_again_so_dataset_level_rights_suffice() -> None:
    client = DatasetRights({"clickstream"})
    anyio.run(ensure_dataset, client, "clickstream")  # type: ignore[arg-type]
    assert client.created == []


def test_a_missing_dataset_is_created() -> None:
    client = DatasetRights(set())
    anyio.run(ensure_dataset, client, "clickstream")  # type: ignore[arg-type]
    assert client.created == ["clickstream"]


@pytest.mark.parametrize("call", ["get_dataset", "insert_all"])
def test_a_bigquery_that_never_answers_is_named_in_the_timeout(monkeypatch: pytest.MonkeyPatch, call: str) -> None:
    """A timeout has no text of its own: the sink's error (its retries, or why it could not start)
    says who did not answer, and after how long."""
    from clickflow_bigquery import client as client_module

    monkeypatch.setattr(client_module, "TIMEOUT", 0.3)

    async def main() -> tuple[str, int]:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1")
        port = listener.extra(anyio.abc.SocketAttribute.local_port)
        monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", f"127.0.0.1:{port}")
        held: list[anyio.abc.SocketStream] = []  # accepted, never answered

        async def hold(stream: anyio.abc.SocketStream) -> None:
            async with stream:
                held.append(stream)
                await anyio.sleep_forever()

        async with listener, anyio.create_task_group() as tasks:
            tasks.start_soon(listener.serve, hold)
            async with client_module.BigQueryClient("demo") as client:
                with pytest.raises(TimeoutError) as raised:
                    if call == "get_dataset":
                        await client.get_dataset("clickstream")
                    else:
                        await client.insert_all("clickstream", "visits", b'{"rows": []}')
            tasks.cancel_scope.cancel()
        assert held
        return str(raised.value), port

    message, port = anyio.run(main)
    assert message == f"BigQuery (http://127.0.0.1:{port}/bigquery/v2) did not answer within 0.3s"
