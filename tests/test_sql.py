"""The analyst queries in ``sql/`` run against the BigQuery emulator and give the right answers.

Fresh visits (timestamped now, so the real-time queries see them) are streamed
in, and every query's result is compared with the same figures computed in
Python from the parsed rows.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest

from clickflow.api import Message, RowBatch
from clickflow.parser import VisitParser
from clickflow.schema import EVENTS, VISITS, EventCol
from clickflow_bigquery.streaming import BigQueryStreamingOptions, BigQueryStreamingSink
from clickflow_simulator import VisitGenerator
from tests.conftest import REPO
from tests.gcp_emulators import BigQueryEmulator

pytestmark = pytest.mark.integration
DATASET = "dashboards"


def query(emulator: BigQueryEmulator, name: str) -> list[dict[str, Any]]:
    sql = (REPO / "sql" / f"{name}.sql").read_text().replace("clickflow.", f"{DATASET}.")
    return emulator.query(sql)


@pytest.fixture(scope="module")
def rows(bigquery_emulator: BigQueryEmulator) -> RowBatch:
    start = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=90)
    payloads = VisitGenerator(seed=21, start=start, visits_per_minute=600).messages(300)
    parsed = VisitParser().parse([Message(p, f"m{i}") for i, p in enumerate(payloads)], "sql", time.time_ns() // 1000)
    stream(bigquery_emulator, DATASET, parsed)
    latest = max(row[EventCol.event_timestamp] for row in parsed.tables["events"])
    assert latest < (time.time() + 60) * 1e6, "all events must fall in the real-time windows"
    return parsed


def stream(emulator: BigQueryEmulator, dataset: str, rows: RowBatch, times: int = 1) -> None:
    """Store ``rows`` with the streaming sink, ``times`` over (the emulator ignores ``insertId``)."""

    async def write() -> None:
        sink = BigQueryStreamingSink("bq", BigQueryStreamingOptions(project=emulator.project, dataset=dataset))
        await sink.open()
        for _ in range(times):
            batch = sink.new_batch()
            batch.add(rows)
            await sink.write(batch)
        await sink.close()

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BIGQUERY_EMULATOR_HOST", emulator.host)
        anyio.run(write)


def column(table: Any, rows: list[tuple[Any, ...]], name: str) -> list[Any]:
    i = table.index(name)
    return [row[i] for row in rows]


def page_views(rows: RowBatch) -> list[tuple[Any, ...]]:
    return [r for r in rows.tables["events"] if r[EventCol.event_type] == "page_view"]


def test_visits_by_page(bigquery_emulator: BigQueryEmulator, rows: RowBatch) -> None:
    views = page_views(rows)
    per_page = Counter(column(EVENTS, views, "page_url"))
    visits = defaultdict(set)
    for page, visit in zip(column(EVENTS, views, "page_url"), column(EVENTS, views, "visit_id"), strict=True):
        visits[page].add(visit)
    result = query(bigquery_emulator, "visits_by_page")
    assert {r["page_url"]: (int(r["page_views"]), int(r["visits"])) for r in result} == {
        page: (count, len(visits[page])) for page, count in per_page.items()
    }
    assert [int(r["page_views"]) for r in result] == sorted(per_page.values(), reverse=True)


def test_popular_items(bigquery_emulator: BigQueryEmulator, rows: RowBatch) -> None:
    units: Counter[str] = Counter()
    for item in rows.dicts("purchase_items"):
        units[item["product_id"]] += item["quantity"]
    expected = sorted(units.items(), key=lambda pair: (-pair[1], pair[0]))[:10]
    result = query(bigquery_emulator, "popular_items")
    assert [(r["product_id"], int(r["units"])) for r in result] == expected


def test_sales_by_category(bigquery_emulator: BigQueryEmulator, rows: RowBatch) -> None:
    revenue: defaultdict[str, float] = defaultdict(float)
    for item in rows.dicts("purchase_items"):
        revenue[item["category"]] += item["price"] * item["quantity"]
    result = query(bigquery_emulator, "sales_by_category")
    assert {r["category"]: float(r["revenue"]) for r in result} == pytest.approx(
        {category: round(total, 2) for category, total in revenue.items()}
    )


def test_visits_by_device(bigquery_emulator: BigQueryEmulator, rows: RowBatch) -> None:
    expected = Counter(column(VISITS, rows.tables["visits"], "device_type"))
    result = query(bigquery_emulator, "visits_by_device")
    assert {r["device_type"]: int(r["visits"]) for r in result} == dict(expected)


def test_clicks_by_page_in_real_time(bigquery_emulator: BigQueryEmulator, rows: RowBatch) -> None:
    pages = [p for p in column(EVENTS, rows.tables["events"], "page_url") if p is not None]
    result = query(bigquery_emulator, "clicks_by_page_realtime")
    assert {r["page_url"]: int(r["clicks"]) for r in result} == dict(Counter(pages))


def test_page_views_per_minute(bigquery_emulator: BigQueryEmulator, rows: RowBatch) -> None:
    minutes = Counter(us // 60_000_000 * 60 for us in column(EVENTS, page_views(rows), "event_timestamp"))
    result = query(bigquery_emulator, "page_views_per_minute")
    assert {seconds(r["minute"]): int(r["page_views"]) for r in result} == dict(minutes)


def seconds(value: str) -> int:
    """A TIMESTAMP cell in seconds: BigQuery sends seconds ("1.7E9"), the emulator microseconds."""
    number = float(value)
    return int(number / 1_000_000 if number > 1e12 else number)


def test_the_deduplicated_views_show_each_key_once(bigquery_emulator: BigQueryEmulator, rows: RowBatch) -> None:
    """The rows stored twice (as an at-least-once sink does after a redelivery), then the views."""
    dataset = "twice"
    stream(bigquery_emulator, dataset, rows, times=2)
    script = (REPO / "sql" / "deduplicated_views.sql").read_text().replace("clickflow.", f"{dataset}.")
    script = "\n".join(line for line in script.splitlines() if not line.startswith("--"))  # one statement a call
    for statement in filter(str.strip, script.split(";")):
        bigquery_emulator.query(statement)
    assert bigquery_emulator.counts(dataset) == {t: 2 * n for t, n in rows.counts().items()}
    for table, count in rows.counts().items():
        unique = bigquery_emulator.query(f"SELECT COUNT(*) AS n FROM `{dataset}.{table}_unique`")
        assert int(unique[0]["n"]) == count, table


def test_no_query_in_sql_goes_untested() -> None:
    queries = {path.stem for path in Path(REPO / "sql").glob("*.sql")}
    assert queries == {
        "visits_by_page",
        "popular_items",
        "sales_by_category",
        "visits_by_device",
        "clicks_by_page_realtime",
        "page_views_per_minute",
        "deduplicated_views",
    }  # fmt: skip (each tested above)
