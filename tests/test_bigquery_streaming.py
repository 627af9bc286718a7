"""The ``bigquery_streaming`` sink against the BigQuery emulator, and its request bodies."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import anyio
import pytest

from clickflow.config import Pipeline
from clickflow.parser import visit_id_for
from clickflow.runtime import PipelineError
from clickflow.summary import RunSummary
from clickflow_bigquery.streaming import BigQueryStreamingOptions, BigQueryStreamingSink
from clickflow_file.reader import iter_messages, with_content_ids
from tests.conftest import files_into
from tests.faults import FaultyProxy
from tests.gcp_emulators import BigQueryEmulator, new_dataset, visits_with_a_bad_event, write_one_batch

pytestmark = [pytest.mark.integration, pytest.mark.anyio]

Stream = Callable[..., tuple[RunSummary, str]]


@pytest.fixture
def proxy(bigquery_env: BigQueryEmulator) -> FaultyProxy:
    return FaultyProxy(f"http://{bigquery_env.host}")


@pytest.fixture
def stream(
    bigquery_env: BigQueryEmulator,
    mixed_visits: tuple[Path, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
) -> Stream:
    """``stream(extra_options="", through=None)``: the mixed visits into a new dataset, straight to
    the emulator or through a FaultyProxy; returns the run's summary and the dataset."""

    def run(extra: str = "", through: FaultyProxy | None = None) -> tuple[RunSummary, str]:
        name = new_dataset("streaming")
        sink = (f"type: bigquery_streaming, project: {bigquery_env.project}, dataset: {name}, "
                f"retry: {{attempts: 4, initial_backoff: 10ms}}{extra}")  # fmt: skip
        with contextlib.ExitStack() as stack:
            if through is not None:
                patch = stack.enter_context(pytest.MonkeyPatch.context())
                patch.setenv("BIGQUERY_EMULATOR_HOST", stack.enter_context(through.running()))
            return clickflow_run(pipeline(files_into(mixed_visits[0], sink))), name

    return run


def test_a_file_streams_in_with_exact_counts(
    bigquery_env: BigQueryEmulator, mixed_visits: tuple[Path, dict[str, int]], stream: Stream
) -> None:
    expected = mixed_visits[1]
    summary, name = stream()
    assert summary.rows == expected
    assert bigquery_env.counts(name) == expected


def test_429_and_5xx_answers_are_retried_and_nothing_is_lost(
    bigquery_env: BigQueryEmulator, mixed_visits: tuple[Path, dict[str, int]], stream: Stream, proxy: FaultyProxy
) -> None:
    expected = mixed_visits[1]
    proxy.fail_next = [429, 500, 503]
    summary, name = stream(through=proxy)
    assert proxy.failed == 3
    assert summary.rows == expected
    assert bigquery_env.counts(name) == expected


def test_a_batch_that_keeps_failing_fails_the_run_instead_of_being_dropped(stream: Stream, proxy: FaultyProxy) -> None:
    proxy.fail_next = [503] * 1000
    with pytest.raises(PipelineError, match="503"):
        stream(through=proxy)
    assert proxy.failed >= 4  # every request of every attempt failed
    assert len(proxy.insert_bodies) == proxy.failed


def test_stopped_rows_are_sent_again(
    bigquery_env: BigQueryEmulator, mixed_visits: tuple[Path, dict[str, int]], stream: Stream, proxy: FaultyProxy
) -> None:
    path, expected = mixed_visits
    with path.open("rb") as file:  # the first 30 messages' visits or dead letters
        proxy.stop_once = {visit_id_for(i) for i, _ in islice(with_content_ids(iter_messages(file, str(path))), 30)}
    summary, name = stream(through=proxy)
    assert not proxy.stop_once  # each was stopped once
    assert summary.rows == expected
    assert bigquery_env.counts(name) == expected


def test_request_bodies_stay_within_limits_and_carry_the_rows_keys_as_insert_ids(
    bigquery_env: BigQueryEmulator, mixed_visits: tuple[Path, dict[str, int]], stream: Stream
) -> None:
    expected = mixed_visits[1]
    runs = []
    for _ in range(2):
        proxy = FaultyProxy(f"http://{bigquery_env.host}")
        stream(", max_rows_per_request: 40, max_request_bytes: 64KiB", through=proxy)
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
    assert visit["visit_start"].endswith("Z")  # timestamps travel as RFC 3339 strings in UTC


async def test_rows_bigquery_calls_invalid_go_to_dead_letter_with_its_message(bigquery_env: BigQueryEmulator) -> None:
    name = new_dataset("streaming")
    sink = BigQueryStreamingSink("bq", BigQueryStreamingOptions(project=bigquery_env.project, dataset=name))
    batch = await write_one_batch(sink, visits_with_a_bad_event(1))
    assert batch.counts() == {"visits": 3, "events": 8, "purchase_items": 3, "dead_letter": 1}
    assert await anyio.to_thread.run_sync(bigquery_env.counts, name) == batch.counts()
    (dead,) = await anyio.to_thread.run_sync(bigquery_env.query, f"SELECT * FROM `{name}.dead_letter`")
    assert dead["reason"] == "bigquery_rejected" and dead["source"] == "bq"
    assert dead["error"].startswith("events: invalid")
    assert json.loads(dead["payload"])["event_index"] == "not a number"
