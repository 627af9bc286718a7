"""The ``bigquery_streaming`` sink against the BigQuery emulator, and its request bodies."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from clickflow.api import Message
from clickflow.config import Pipeline
from clickflow.parser import VisitParser, visit_id_for
from clickflow.runtime import PipelineError, RunSummary
from clickflow.schema import EVENTS
from clickflow_bigquery.streaming import BigQueryStreamingOptions, BigQueryStreamingSink
from tests.conftest import VALID_VISIT
from tests.faults import FaultyProxy
from tests.gcp_emulators import BigQueryEmulator

pytestmark = [pytest.mark.integration, pytest.mark.anyio]
_datasets = itertools.count()


def dataset() -> str:
    return f"streaming_{next(_datasets)}"


def test_a_file_streams_in_with_exact_counts(
    bigquery_env: BigQueryEmulator,
    mixed_visits: tuple[Path, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
) -> None:
    name = dataset()
    path, expected = mixed_visits
    text = (
        f"sources: [{{type: file, path: '{path}'}}]\n"
        f"sinks: [{{type: bigquery_streaming, project: {bigquery_env.project}, dataset: {name}}}]"
    )
    summary = clickflow_run(pipeline(text))
    assert summary.rows == expected
    assert bigquery_env.counts(name) == expected


def streaming_pipeline(path: Path, project: str, name: str, extra: str = "") -> str:
    return (
        f"sources: [{{type: file, path: '{path}'}}]\n"
        f"sinks: [{{type: bigquery_streaming, project: {project}, dataset: {name}, "
        f"retry: {{attempts: 4, initial_backoff: 10ms}}{extra}}}]"
    )


def test_429_and_5xx_answers_are_retried_and_nothing_is_lost(
    bigquery_env: BigQueryEmulator,
    mixed_visits: tuple[Path, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, expected = mixed_visits
    proxy = FaultyProxy(f"http://{bigquery_env.host}")
    proxy.fail_next = [429, 500, 503]
    name = dataset()
    with proxy.running() as host:
        monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", host)
        summary = clickflow_run(pipeline(streaming_pipeline(path, bigquery_env.project, name)))
    assert proxy.failed == 3
    assert summary.rows == expected
    assert bigquery_env.counts(name) == expected


def test_a_batch_that_keeps_failing_fails_the_run_instead_of_being_dropped(
    bigquery_env: BigQueryEmulator,
    mixed_visits: tuple[Path, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, _ = mixed_visits
    proxy = FaultyProxy(f"http://{bigquery_env.host}")
    proxy.fail_next = [503] * 1000
    with proxy.running() as host, pytest.raises(PipelineError, match="503"):
        monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", host)
        clickflow_run(pipeline(streaming_pipeline(path, bigquery_env.project, dataset())))
    assert proxy.failed >= 4  # every request of every attempt failed
    assert len(proxy.insert_bodies) == proxy.failed


def test_stopped_rows_are_sent_again(
    bigquery_env: BigQueryEmulator,
    mixed_visits: tuple[Path, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, expected = mixed_visits
    proxy = FaultyProxy(f"http://{bigquery_env.host}")
    name = dataset()
    with proxy.running() as host:
        monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", host)
        proxy.stop_once = {visit_id_for(f"{path}:{line}") for line in range(1, 31)}  # visits or dead letters
        summary = clickflow_run(pipeline(streaming_pipeline(path, bigquery_env.project, name)))
    assert not proxy.stop_once  # each was stopped once
    assert summary.rows == expected
    assert bigquery_env.counts(name) == expected


def test_request_bodies_stay_within_limits_and_carry_the_rows_keys_as_insert_ids(
    bigquery_env: BigQueryEmulator,
    mixed_visits: tuple[Path, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path, expected = mixed_visits
    runs = []
    for _ in range(2):
        proxy = FaultyProxy(f"http://{bigquery_env.host}")
        with proxy.running() as host:
            monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", host)
            limits = ", max_rows_per_request: 40, max_request_bytes: 64KiB"
            clickflow_run(pipeline(streaming_pipeline(path, bigquery_env.project, dataset(), limits)))
        runs.append(proxy.insert_bodies)
    for body in runs[0]:
        assert len(body) <= 64 * 1024
        assert len(json.loads(body)["rows"]) <= 40
    insert_ids = [[row["insertId"] for body in bodies for row in json.loads(body)["rows"]] for bodies in runs]
    assert len(insert_ids[0]) == sum(expected.values()) == len(set(insert_ids[0]))
    assert sorted(insert_ids[0]) == sorted(insert_ids[1])  # deterministic: a redelivery is recognised
    keys = {row["insertId"]: row["json"] for body in runs[0] for row in json.loads(body)["rows"]}
    visit = next(row for row in keys.values() if "visit_start" in row)
    assert keys[visit["visit_id"]] == visit
    assert visit["visit_start"].endswith("+00:00")  # timestamps travel as strings


async def test_rows_bigquery_calls_invalid_go_to_dead_letter_with_its_message(bigquery_env: BigQueryEmulator) -> None:
    messages = [Message(json.dumps(VALID_VISIT).encode(), f"m{i}") for i in range(3)]
    rows = VisitParser().parse(messages, "test", 1_719_824_400_000_000)
    bad = list(rows.tables["events"][1])
    bad[EVENTS.index("event_index")] = "not a number"
    rows.tables["events"][1] = tuple(bad)
    name = dataset()
    sink = BigQueryStreamingSink("bq", BigQueryStreamingOptions(project=bigquery_env.project, dataset=name))
    await sink.open()
    try:
        batch = sink.new_batch()
        batch.add(rows)
        await sink.write(batch)
    finally:
        await sink.close()
    assert batch.counts() == {"visits": 3, "events": 8, "purchase_items": 3, "dead_letter": 1}
    assert await anyio.to_thread.run_sync(bigquery_env.counts, name) == batch.counts()
    (dead,) = await anyio.to_thread.run_sync(bigquery_env.query, f"SELECT * FROM `{name}.dead_letter`")
    assert dead["reason"] == "bigquery_rejected" and dead["source"] == "bq"
    assert dead["error"].startswith("events: invalid")
    assert json.loads(dead["payload"])["event_index"] == "not a number"
