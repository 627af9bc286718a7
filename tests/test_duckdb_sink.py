"""The DuckDB sink against a real DuckDB file: bulk writes, idempotency, types."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import duckdb
import pytest

from clickflow.api import Message, RowBatch
from clickflow.parser import VisitParser
from clickflow_duckdb import DuckDBSink, DuckDBSinkOptions
from clickflow_duckdb.tables import KEYS
from tests.conftest import table_counts

pytestmark = pytest.mark.anyio


def parsed(visits: list[Any], prefix: str = "m") -> RowBatch:
    messages = [Message(json.dumps(v).encode(), f"{prefix}{i}") for i, v in enumerate(visits)]
    return VisitParser().parse(messages, "test", 1_719_824_400_000_000)


async def write(path: Path, *batches: RowBatch) -> None:
    """Write each list of parsed batches as one sink batch, like the runtime does."""
    sink = DuckDBSink("duckdb", DuckDBSinkOptions(path=str(path)))
    await sink.open()
    try:
        for rows in batches:
            batch = sink.new_batch()
            batch.add(rows)
            await sink.write(batch)
    finally:
        await sink.close()


async def test_creates_the_four_tables_with_the_schema_columns(tmp_path: Path) -> None:
    from clickflow.schema import TABLES

    await write(tmp_path / "db.duckdb")
    with duckdb.connect(str(tmp_path / "db.duckdb"), read_only=True) as con:
        for table in TABLES.values():
            names = [row[0] for row in con.execute(f"DESCRIBE {table.name}").fetchall()]
            assert names == [*table.column_names, *([KEYS[table.name][0]] if table.name in KEYS else [])]


async def test_rows_round_trip_with_types_and_utc_times(tmp_path: Path, visit: Callable[..., dict[str, Any]]) -> None:
    await write(tmp_path / "db.duckdb", parsed([visit(user_agent='quote " comma , newline \n é 😀')]))
    with duckdb.connect(str(tmp_path / "db.duckdb"), read_only=True) as con:
        con.execute("SET TimeZone = 'America/New_York'")
        agent, start, lat = con.execute("SELECT user_agent, visit_start, latitude FROM visits").fetchone()  # type: ignore[misc]
        price, qty, ts = con.execute(
            "SELECT price, quantity, event_timestamp FROM events WHERE event_type = 'add_item_to_cart'"
        ).fetchone()  # type: ignore[misc]
    assert agent == 'quote " comma , newline \n é 😀'
    assert start.astimezone(UTC) == datetime(2024, 7, 1, 9, 0, tzinfo=UTC)
    assert (lat, price, qty) == (37.7749, 29.99, 2)
    assert ts.astimezone(UTC) == datetime(2024, 7, 1, 9, 0, 5, tzinfo=UTC)


async def test_redelivered_messages_are_not_written_twice(tmp_path: Path, visit: Callable[..., dict[str, Any]]) -> None:
    first = parsed([visit(), b"not json".decode(), visit()])
    overlapping = parsed([visit(), b"not json".decode(), visit(), visit()])  # m0..m2 again, m3 new
    await write(tmp_path / "db.duckdb", first, first, overlapping)  # all seen before, then some
    assert table_counts(tmp_path / "db.duckdb") == {"visits": 3, "events": 9, "purchase_items": 3, "dead_letter": 1}


async def test_visit_key_is_the_visit_id_as_a_number(tmp_path: Path, visit: Callable[..., dict[str, Any]]) -> None:
    await write(tmp_path / "db.duckdb", parsed([visit(), visit()]))
    with duckdb.connect(str(tmp_path / "db.duckdb"), read_only=True) as con:
        pairs = con.execute("SELECT visit_id, visit_key FROM visits").fetchall()
    assert len(pairs) == 2 and all(key == int(visit_id, 16) for visit_id, key in pairs)


def with_dead_letters(visit: Callable[..., dict[str, Any]], prefix: str = "m") -> RowBatch:
    """Two visits, each with a dead-lettered event (the second, twice), and a message dead-lettered whole."""
    bad_event = {"event_type": "page_view", "timestamp": "not a time", "details": {}}
    visits = [visit(events=[*visit()["events"], bad_event]), visit(events=[bad_event, bad_event]), "not json"]
    return parsed(visits, prefix)


async def test_dead_letter_key_is_the_visit_id_part_as_a_number_and_redeliveries_are_stored_once(
    tmp_path: Path, visit: Callable[..., dict[str, Any]]
) -> None:
    db = tmp_path / "db.duckdb"
    rows = with_dead_letters(visit)
    assert len(rows.tables["dead_letter"]) == 4
    await write(db, rows, rows, with_dead_letters(visit, prefix="again"))
    with duckdb.connect(str(db), read_only=True) as con:
        keyed = con.execute("SELECT dead_letter_id, event_index, dead_letter_key FROM dead_letter").fetchall()
    assert len(keyed) == 8  # each batch's four once: the same ids under other messages are other letters
    assert len({(key, index) for _, index, key in keyed}) == 8
    assert all(key == int(dead_letter_id.split(":")[0], 16) for dead_letter_id, _, key in keyed)
    assert {index for _, index, _ in keyed} == {None, 0, 1, 3}


async def test_a_file_from_before_the_keys_is_keyed_and_still_drops_redeliveries(
    tmp_path: Path, visit: Callable[..., dict[str, Any]]
) -> None:
    db = tmp_path / "db.duckdb"
    first = parsed([visit(), visit()])
    await write(db, first)
    letters = with_dead_letters(visit, prefix="d")
    await write(db, letters)
    with duckdb.connect(str(db)) as con:  # as clickflow stored visits and dead letters before the keys
        con.execute("ALTER TABLE visits DROP COLUMN visit_key")
        con.execute("ALTER TABLE dead_letter DROP COLUMN dead_letter_key")
        con.execute("INSERT INTO visits (visit_id, session_id, event_count, rejected_event_count, source, message_id, "
                    "ingested_at) VALUES ('not hex', 's', 0, 0, 'other writer', 'x', now())")  # fmt: skip
    await write(db, first, parsed([visit(), visit(), visit()]), letters)  # m0, m1 again, then m2 new; the letters again
    with duckdb.connect(str(db), read_only=True) as con:
        keys = con.execute("SELECT visit_id, visit_key FROM visits WHERE source <> 'other writer'").fetchall()
        unkeyed = con.execute("SELECT visit_key FROM visits WHERE source = 'other writer'").fetchall()
        letter_keys = con.execute("SELECT dead_letter_id, dead_letter_key FROM dead_letter").fetchall()
    assert len(keys) == 5 and all(key == int(visit_id, 16) for visit_id, key in keys)
    assert unkeyed == [(None,)]
    assert len(letter_keys) == 4 and all(key == int(i.split(":")[0], 16) for i, key in letter_keys)
    assert table_counts(db) == {"visits": 6, "events": 12, "purchase_items": 4, "dead_letter": 4}


async def test_a_message_twice_in_one_batch_is_written_once(
    tmp_path: Path, visit: Callable[..., dict[str, Any]]
) -> None:
    sink = DuckDBSink("duckdb", DuckDBSinkOptions(path=str(tmp_path / "db.duckdb")))
    await sink.open()
    batch = sink.new_batch()
    batch.add(parsed([visit(), "garbage"]))
    batch.add(parsed([visit(), "garbage"]))
    await sink.write(batch)
    await sink.close()
    assert table_counts(tmp_path / "db.duckdb") == {"visits": 1, "events": 3, "purchase_items": 1, "dead_letter": 1}


async def test_a_failed_write_leaves_nothing_behind(tmp_path: Path, visit: Callable[..., dict[str, Any]]) -> None:
    sink = DuckDBSink("duckdb", DuckDBSinkOptions(path=str(tmp_path / "db.duckdb")))
    await sink.open()
    batch = sink.new_batch()
    batch.add(parsed([visit()]))
    batch.close()
    await anyio.Path(batch.paths["events"]).write_text("this is not JSON\n")  # the events insert will fail
    with pytest.raises(duckdb.Error):
        await sink.write(batch)
    await sink.close()
    assert table_counts(tmp_path / "db.duckdb") == {"visits": 0, "events": 0, "purchase_items": 0, "dead_letter": 0}


async def test_without_create_tables_a_missing_database_or_table_stops_the_open_and_nothing_is_made(
    tmp_path: Path,
) -> None:
    from clickflow_duckdb.tables import MissingTables

    db = tmp_path / "db.duckdb"
    with pytest.raises(
        MissingTables,
        match=r"db.duckdb does not exist \(a `clickflow run` with `create_tables` on, its default, makes it\)",
    ):
        await DuckDBSink("duckdb", DuckDBSinkOptions(path=str(db), create_tables=False)).open()
    assert not db.exists()
    await write(db)  # made, with the four tables
    with duckdb.connect(str(db)) as con:
        con.execute("DROP TABLE purchase_items")
        con.execute("ALTER TABLE events DROP COLUMN currency")
    with pytest.raises(MissingTables, match=r"lacks table\(s\) purchase_items; column\(s\) events.currency \("):
        await DuckDBSink("duckdb", DuckDBSinkOptions(path=str(db), create_tables=False)).open()
    await write(db)  # a sink that creates them puts them back
    assert table_counts(db)["purchase_items"] == 0


async def test_unwritable_path_fails_at_open(tmp_path: Path) -> None:
    sink = DuckDBSink("duckdb", DuckDBSinkOptions(path=str(tmp_path / "no-such-dir" / "db.duckdb")))
    with pytest.raises(duckdb.Error):
        await sink.open()


async def test_batch_files_live_beside_the_database_and_a_killed_runs_leftovers_are_removed(
    tmp_path: Path, visit: Callable[..., dict[str, Any]]
) -> None:
    leftover = tmp_path / "db.duckdb.spool" / "batch-killed" / "visits.ndjson"
    leftover.parent.mkdir(parents=True)
    leftover.write_text("[]\n")
    sink = DuckDBSink("duckdb", DuckDBSinkOptions(path=str(tmp_path / "db.duckdb")))
    await sink.open()
    assert list((tmp_path / "db.duckdb.spool").iterdir()) == []
    batch = sink.new_batch()
    batch.add(parsed([visit()]))
    assert len(list((tmp_path / "db.duckdb.spool").iterdir())) == 1
    await sink.write(batch)
    await sink.close()
    assert not (tmp_path / "db.duckdb.spool").exists()
    assert table_counts(tmp_path / "db.duckdb")["visits"] == 1


def test_settings_reach_duckdb(tmp_path: Path) -> None:
    from clickflow_duckdb import connect

    options = DuckDBSinkOptions(
        path=str(tmp_path / "s.duckdb"), memory_limit="64MiB", settings={"checkpoint_threshold": "32MiB"}
    )
    names = ("memory_limit", "checkpoint_threshold", "threads", "max_vacuum_tasks")
    with connect(options) as con:
        settings = dict(con.execute(f"SELECT name, value FROM duckdb_settings() WHERE name IN {names}").fetchall())
    assert settings == {
        "memory_limit": "64.0 MiB", "checkpoint_threshold": "32.0 MiB", "threads": "1", "max_vacuum_tasks": "0"
    }  # fmt: skip
