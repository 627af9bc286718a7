"""Dead letters replayed: produced under one parser rule, replayed once the rule is relaxed, stored
exactly once in DuckDB and in the BigQuery emulator, marked, and a second replay changes nothing."""

from __future__ import annotations

import json
import random
import string
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import duckdb
import pytest

from clickflow.api import Message, RowBatch
from clickflow.config import Pipeline
from clickflow.dlq import DeadLetterPage, DeadLetterQuery, DeadLetterStore, ReplayReport, StoredDeadLetter, replay
from clickflow.parser import VisitParser
from clickflow.rejections import PARSER_VERSION
from clickflow.schema import DEAD_LETTER, EVENTS, PURCHASE_ITEMS, VISITS, DeadLetterCol
from clickflow.summary import RunSummary
from clickflow_simulator import VisitGenerator
from tests.conftest import table_counts
from tests.emulators import clickflow
from tests.gcp_emulators import BigQueryEmulator, new_dataset

LIMIT = 1500
"""The first rule: messages over 1,500 bytes are too large (about half of them)."""


class ClicksParser(VisitParser):
    """The second, relaxed rules (a parser for tests only): a ``click`` event is a page view."""

    def _reference_event(self, element: Any, head6: Any, now: int, events: list[Any], items: list[Any]) -> int:
        event = element.get("event", element) if isinstance(element, dict) else element
        if isinstance(event, dict) and event.get("event_type") == "click":
            event = {**event, "event_type": "page_view"}
        return super()._reference_event(event, head6, now, events, items)


@pytest.fixture(scope="module")
def visits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """300 visits, every tenth with a ``click`` event; and the rows the relaxed rules make of them."""
    lines = []
    for index, message in enumerate(VisitGenerator(seed=5).messages(300)):
        visit = json.loads(message)
        if index % 10 == 0:
            first = visit["events"][0]
            first.get("event", first)["event_type"] = "click"
        lines.append(json.dumps(visit).encode())
    path = tmp_path_factory.mktemp("dlq") / "visits.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    messages = [Message(line, f"{path}:{n}") for n, line in enumerate(lines, 1)]
    relaxed = ClicksParser().parse(messages, "file", 0).counts()
    assert relaxed["dead_letter"] == 0 and relaxed["visits"] == 300
    return path, relaxed


def pipeline_text(path: Path, sink: str, limit: int | str = LIMIT) -> str:
    return f"sources: [{{type: file, path: '{path}'}}]\nsinks: [{{{sink}}}]\nruntime: {{max_message_bytes: {limit}}}\n"


def replay_with(loaded: Pipeline, parser: VisitParser, dry_run: bool = False) -> ReplayReport:
    async def run() -> ReplayReport:
        sinks = [component.build() for component in loaded.sinks]
        for sink in sinks:
            await sink.open()
        try:
            stores = [sink for sink in sinks if isinstance(sink, DeadLetterStore)]
            return await replay(stores, DeadLetterQuery(), parser, dry_run=dry_run)
        finally:
            for sink in sinks:
                await sink.close()

    return anyio.run(run)


def first_run(pipeline: Callable[..., Pipeline], clickflow_run: Callable[[Pipeline], RunSummary], text: str) -> None:
    summary = clickflow_run(pipeline(text))
    assert summary.dead_letters["too_large"] > 100 and summary.dead_letters["unknown_event_type"] > 10


def assert_replays_exactly_once(
    loaded: Pipeline, relaxed: dict[str, int], counts: Callable[[], dict[str, int]], unreplayed: Callable[[], int]
) -> None:
    parser = ClicksParser(10 * 1024 * 1024)
    dry = replay_with(loaded, parser, dry_run=True)
    before = counts()
    assert dry.replayed["too_large"] > 100 and counts() == before and unreplayed() == before["dead_letter"]

    report = replay_with(loaded, parser)
    assert report.replayed == dry.replayed and not report.still_failing and not report.not_replayable
    stored = counts()
    assert {t: stored[t] for t in ("visits", "events", "purchase_items")} == {
        t: relaxed[t] for t in ("visits", "events", "purchase_items")
    }
    assert stored["dead_letter"] == before["dead_letter"]  # kept, and marked
    assert unreplayed() == 0

    again = replay_with(loaded, parser)
    assert not again.replayed and not again.still_failing and counts() == stored


@pytest.fixture
def small_pages(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages of 16 dead letters (DuckDB's of 8 KB too): a replay reads many, marking as it goes."""
    import clickflow_bigquery.deadletters
    import clickflow_duckdb.deadletters

    for module in (clickflow_duckdb.deadletters, clickflow_bigquery.deadletters):
        monkeypatch.setattr(module, "PAGE_ROWS", 16)
    monkeypatch.setattr(clickflow_duckdb.deadletters, "PAGE_BYTES", 8192)


@pytest.mark.parametrize("pages", ["one page", "small pages"])
def test_duckdb_dead_letters_replay_once_under_relaxed_rules(
    visits: tuple[Path, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
    tmp_path: Path,
    request: pytest.FixtureRequest,
    pages: str,
) -> None:
    if pages == "small pages":
        request.getfixturevalue("small_pages")
    path, relaxed = visits
    db = tmp_path / "dlq.duckdb"
    sink = f"type: duckdb, path: '{db}'"
    first_run(pipeline, clickflow_run, pipeline_text(path, sink))

    def unreplayed() -> int:
        with duckdb.connect(str(db), read_only=True) as con:
            return con.execute("SELECT count(*) FROM dead_letter WHERE replayed_at IS NULL").fetchone()[0]  # type: ignore[index,no-any-return]

    assert_replays_exactly_once(pipeline(pipeline_text(path, sink)), relaxed, lambda: table_counts(db), unreplayed)


@pytest.mark.integration
@pytest.mark.parametrize("sink_type", ["bigquery_streaming", "bigquery_load"])
def test_bigquery_dead_letters_replay_once_under_relaxed_rules(
    visits: tuple[Path, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
    bigquery_env: BigQueryEmulator,
    sink_type: str,
    tmp_path: Path,
    small_pages: None,
) -> None:
    path, relaxed = visits
    dataset = new_dataset("dlq")
    staging = ", staging: gs://clickflow-staging/dlq" if sink_type == "bigquery_load" else ""
    sink = f"type: {sink_type}, project: {bigquery_env.project}, dataset: {dataset}{staging}"
    first_run(pipeline, clickflow_run, pipeline_text(path, sink))

    def unreplayed() -> int:
        rows = bigquery_env.query(f"SELECT COUNT(*) AS n FROM `{dataset}.dead_letter` WHERE replayed_at IS NULL")
        return int(rows[0]["n"])

    loaded = pipeline(pipeline_text(path, sink))
    assert_replays_exactly_once(loaded, relaxed, lambda: bigquery_env.counts(dataset), unreplayed)


def test_a_replay_reads_only_dead_letters_from_before_it_not_those_it_makes(
    visits: tuple[Path, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
    tmp_path: Path,
    small_pages: None,
) -> None:
    """Under today's rules a ``click`` is still unknown: a too-large visit replayed is stored with a
    new dead letter for its click, received now, which the replay's later pages must not read again."""
    path, _ = visits
    db = tmp_path / "own.duckdb"
    loaded = pipeline(pipeline_text(path, f"type: duckdb, path: '{db}'"))
    first = clickflow_run(loaded)
    report = replay_with(loaded, VisitParser(10 * 1024 * 1024))
    assert report.replayed == {"too_large": first.dead_letters["too_large"]}
    assert report.still_failing == {"unknown_event_type": first.dead_letters["unknown_event_type"]}
    made = report.rows["dead_letter"]
    assert made > 0 and table_counts(db)["dead_letter"] == sum(first.dead_letters.values()) + made
    again = replay_with(loaded, VisitParser(10 * 1024 * 1024))
    assert again.still_failing == {"unknown_event_type": first.dead_letters["unknown_event_type"] + made}


def test_dead_letters_past_memory_limit_are_stored_in_parts_and_replayed_a_page_at_a_time(tmp_path: Path) -> None:
    """20,000 malformed messages of 4 KB under a 64MB ``memory_limit``: storing them in one
    transaction ran out of it, and so did reading them back whole for a replay."""
    rng = random.Random(3)
    source, db, pipeline_file = tmp_path / "garbage.jsonl", tmp_path / "big.duckdb", tmp_path / "p.yaml"
    with source.open("w") as out:
        for i in range(20_000):
            out.write(
                f'{{"session_id": "s{i}", "events": [' + "".join(rng.choices(string.ascii_letters, k=4000)) + "\n"
            )
    sink = f"type: duckdb, path: '{db}', memory_limit: 64MB"
    pipeline_file.write_text(f"sources: [{{type: file, path: '{source}'}}]\nsinks: [{{{sink}}}]\n")
    run = clickflow("run", "--no-progress", str(pipeline_file))
    assert run.returncode == 0, run.stderr
    assert table_counts(db)["dead_letter"] == 20_000
    dry = clickflow("dlq", "replay", "--dry-run", str(pipeline_file))
    assert dry.returncode == 0, dry.stderr
    assert "still failing   invalid_json 20,000" in dry.stdout


def test_the_commands_list_and_replay_a_pipelines_dead_letters(
    visits: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    path, relaxed = visits
    db = tmp_path / "cli.duckdb"
    strict, lenient = tmp_path / "strict.yaml", tmp_path / "lenient.yaml"
    strict.write_text(pipeline_text(path, f"type: duckdb, path: '{db}'"))
    lenient.write_text(pipeline_text(path, f"type: duckdb, path: '{db}'", "10MiB"))
    assert clickflow("run", str(strict)).returncode == 0
    listed = clickflow("dlq", "list", str(strict))
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.splitlines()
    total = table_counts(db)["dead_letter"]
    assert lines[0] == f"{total:,} dead letters not yet replayed in duckdb 'duckdb'"
    assert any(line.split()[:2] == ["too_large", "file"] for line in lines)

    dry = clickflow("dlq", "replay", "--dry-run", "--reason", "too_large", str(lenient))
    assert dry.returncode == 0 and "would replay    too_large" in dry.stdout
    assert table_counts(db)["dead_letter"] == total
    metrics = tmp_path / "replay.prom"
    done = clickflow("dlq", "replay", "--reason", "too_large", "--metrics-file", str(metrics), str(lenient))
    assert done.returncode == 0, done.stderr
    sample = 'clickflow_dlq_replayed_total{reason="too_large"}'
    replayed = float(next(line for line in metrics.read_text().splitlines() if line.startswith(sample)).split()[-1])
    assert replayed > 100 and table_counts(db)["visits"] == relaxed["visits"]
    left = clickflow("dlq", "list", "--reason", "too_large", str(lenient))
    assert left.stdout.startswith("0 dead letters not yet replayed")


@pytest.mark.parametrize("command", [["list"], ["replay"], ["replay", "--dry-run"]])
def test_a_database_that_does_not_exist_is_named_not_made(tmp_path: Path, command: list[str]) -> None:
    """A mistyped path used to make an empty database, and list 0 dead letters in it."""
    db = tmp_path / "typo.duckdb"
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"sources: [{{type: simulator, count: 1}}]\nsinks: [{{type: duckdb, path: '{db}'}}]\n")
    result = clickflow("dlq", *command, str(pipeline))
    assert result.returncode == 1
    assert f"{pipeline}: duckdb 'duckdb' holds no dead letters: its database {db} does not exist" in result.stderr
    assert list(tmp_path.iterdir()) == [pipeline]


def letter(dead_letter_id: str, payload: bytes, size: int | None, reason: str = "too_large") -> StoredDeadLetter:
    return StoredDeadLetter(dead_letter_id, 0, "file", "visits.jsonl:7", None, reason, payload, size)


def test_what_cannot_be_parsed_again_says_why() -> None:
    assert letter("v1", b"{}", 2).why_not_replayable() is None
    assert "send message visits.jsonl:7 again" in (letter("v1", b"{", 70_000).why_not_replayable() or "")
    assert "send message" in (letter("v1", b"{", None).why_not_replayable() or "")  # stored before sizes were
    refused = letter("events/v1:0", b"{}", None, "bigquery_rejected")
    assert "a row a sink refused" in (refused.why_not_replayable() or "")


def test_an_event_whose_visit_is_not_stored_is_not_replayable() -> None:
    class Store:
        def __init__(self) -> None:
            self.marked: list[str] = []

        async def dead_letter_groups(self, query: DeadLetterQuery) -> list[Any]:
            return []

        async def dead_letters(self, query: DeadLetterQuery) -> AsyncIterator[DeadLetterPage]:
            event = StoredDeadLetter("v:0", 0, "file", "m1", 0, "unknown_event_type", b'{"event_type": "x"}', 19)
            yield DeadLetterPage([event])

        async def visit_contexts(self, visit_ids: list[str]) -> dict[str, Any]:
            return {}

        async def store_replayed(self, rows: RowBatch) -> None:
            raise AssertionError("nothing to store")

        async def mark_replayed(self, ids: list[str], at_us: int) -> None:
            self.marked += ids

    store = Store()
    report = anyio.run(replay, [store], DeadLetterQuery(), VisitParser())
    assert report.not_replayable == {"unknown_event_type": 1} and "its visit is not stored" in report.notes[0]
    assert store.marked == []


OLD_DEAD_LETTER_COLUMNS = DEAD_LETTER.columns[: DeadLetterCol.payload_bytes]
"""``dead_letter`` as clickflow made it before dead letters could be replayed."""


def test_a_duckdb_file_from_before_gains_the_new_dead_letter_columns(
    visits: tuple[Path, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
    tmp_path: Path,
) -> None:
    db = tmp_path / "old.duckdb"
    make_old_duckdb_tables(db)
    first_run(pipeline, clickflow_run, pipeline_text(visits[0], f"type: duckdb, path: '{db}'"))
    with duckdb.connect(str(db), read_only=True) as con:
        versions = con.execute("SELECT DISTINCT parser_version FROM dead_letter").fetchall()
        sizes = con.execute("SELECT count(*) FROM dead_letter WHERE payload_bytes > 0").fetchone()
    assert versions == [(PARSER_VERSION,)] and sizes == (table_counts(db)["dead_letter"],)


def make_old_duckdb_tables(db: Path) -> None:
    """The four tables, ``dead_letter`` as it was before replays."""
    from clickflow_duckdb.tables import DUCKDB_TYPES, create_table_sql

    with duckdb.connect(str(db)) as con:
        for table in (VISITS, EVENTS, PURCHASE_ITEMS):
            con.execute(create_table_sql(table))
        columns = ", ".join(f"{c.name} {DUCKDB_TYPES[c.type]}" for c in OLD_DEAD_LETTER_COLUMNS)
        con.execute(f"CREATE TABLE dead_letter ({columns})")


def duckdb_columns(db: Path) -> list[tuple[str, str]]:
    with duckdb.connect(str(db), read_only=True) as con:
        return con.execute("SELECT table_name, column_name FROM duckdb_columns() ORDER BY ALL").fetchall()


@pytest.mark.parametrize("made_by", ["another program", "clickflow before replays"])
def test_a_duckdb_table_or_column_that_is_not_there_is_named_not_made(tmp_path: Path, made_by: str) -> None:
    """``clickflow dlq`` creates nothing in DuckDB either: another program's database used to gain
    clickflow's four empty tables, and list 0 dead letters."""
    db = tmp_path / "found.duckdb"
    if made_by == "another program":
        with duckdb.connect(str(db)) as con:
            con.execute("CREATE TABLE orders (id INTEGER)")
        lacking = "table(s) visits, events, purchase_items, dead_letter"
    else:
        make_old_duckdb_tables(db)
        new_columns = DEAD_LETTER.columns[len(OLD_DEAD_LETTER_COLUMNS) :]
        lacking = f"column(s) {', '.join(f'dead_letter.{c.name}' for c in new_columns)}, dead_letter.dead_letter_key"
    before = duckdb_columns(db)
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(f"sources: [{{type: simulator, count: 1}}]\nsinks: [{{type: duckdb, path: '{db}'}}]\n")
    for command in (["list"], ["replay"]):
        result = clickflow("dlq", *command, str(pipeline))
        assert result.returncode == 1, result.stdout
        assert (
            result.stderr
            == f"clickflow: {db} lacks {lacking} (a `clickflow run` with `create_tables` on, its default, adds them)\n"
        )
    assert duckdb_columns(db) == before


async def make_old_bigquery_tables(project: str, dataset: str) -> None:
    """The four tables in a new dataset, ``dead_letter`` as it was before replays."""
    from clickflow_bigquery.client import BigQueryClient
    from clickflow_bigquery.tables import table_resource

    async with BigQueryClient(project) as client:
        await client.create_dataset(dataset)
        for table in (VISITS, EVENTS, PURCHASE_ITEMS, DEAD_LETTER):
            resource = table_resource(table)
            if table is DEAD_LETTER:
                resource["schema"]["fields"] = resource["schema"]["fields"][: len(OLD_DEAD_LETTER_COLUMNS)]
            await client.create_table(dataset, table.name, resource)


@pytest.mark.integration
def test_a_bigquery_table_from_before_gains_the_new_dead_letter_columns(
    visits: tuple[Path, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
    bigquery_env: BigQueryEmulator,
) -> None:
    dataset = new_dataset("old")
    anyio.run(make_old_bigquery_tables, bigquery_env.project, dataset)
    sink = f"type: bigquery_streaming, project: {bigquery_env.project}, dataset: {dataset}"
    first_run(pipeline, clickflow_run, pipeline_text(visits[0], sink))
    rows = bigquery_env.query(f"SELECT parser_version, COUNT(*) AS n FROM `{dataset}.dead_letter` GROUP BY 1")
    assert [(r["parser_version"], int(r["n"])) for r in rows] == [
        (PARSER_VERSION, bigquery_env.counts(dataset)["dead_letter"])
    ]


@pytest.mark.integration
def test_a_bigquery_dataset_or_column_that_is_not_there_is_named_not_made(
    bigquery_env: BigQueryEmulator, tmp_path: Path
) -> None:
    """``clickflow dlq`` creates nothing: a mistyped dataset used to be made, with empty tables, and
    listed 0 dead letters; tables from before the replay columns used to gain them."""
    from clickflow_bigquery.client import BigQueryClient, BigQueryError

    typo, old = new_dataset("typo"), new_dataset("old")
    pipeline = tmp_path / "p.yaml"

    def dlq_list(dataset: str) -> str:
        sink = f"{{type: bigquery_streaming, project: {bigquery_env.project}, dataset: {dataset}}}"
        pipeline.write_text(f"sources: [{{type: simulator, count: 1}}]\nsinks: [{sink}]\n")
        result = clickflow("dlq", "list", str(pipeline))
        assert result.returncode == 1, result.stdout
        return result.stderr

    async def datasets_and_dead_letter_columns() -> tuple[list[int], list[str]]:
        async with BigQueryClient(bigquery_env.project) as client:
            statuses = []
            for dataset in (typo, old):
                try:
                    await client.get_dataset(dataset)
                    statuses.append(200)
                except BigQueryError as exc:
                    statuses.append(exc.status)
            found = await client.get_table(old, "dead_letter")
            return statuses, [f["name"] for f in found["schema"]["fields"]]

    anyio.run(make_old_bigquery_tables, bigquery_env.project, old)
    missing = dlq_list(typo)
    for table in ("visits", "events", "purchase_items", "dead_letter"):
        assert f"{bigquery_env.project}.{typo}.{table} does not exist" in missing
    lacking = dlq_list(old)
    new_columns = ", ".join(c.name for c in DEAD_LETTER.columns[len(OLD_DEAD_LETTER_COLUMNS) :])
    assert f"{bigquery_env.project}.{old}.dead_letter lacks column(s) {new_columns}" in lacking
    assert anyio.run(datasets_and_dead_letter_columns) == ([404, 200], [c.name for c in OLD_DEAD_LETTER_COLUMNS])
