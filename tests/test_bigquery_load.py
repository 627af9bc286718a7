"""The ``bigquery_load`` sink against the BigQuery emulator (and Cloud Storage emulator, staged)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from clickflow.config import Pipeline
from clickflow.summary import RunSummary
from clickflow_bigquery.load import BigQueryLoadOptions, BigQueryLoadSink
from tests.conftest import files_into
from tests.gcp_emulators import (
    STAGING_BUCKET,
    BigQueryEmulator,
    new_dataset,
    visits_with_a_bad_event,
    write_one_batch,
)

pytestmark = [pytest.mark.integration, pytest.mark.anyio]


def load_pipeline(path: Path, project: str, name: str, extra: str = "") -> str:
    return files_into(path, f"type: bigquery_load, project: {project}, dataset: {name}, "
                            f"retry: {{attempts: 3, initial_backoff: 10ms}}{extra}")  # fmt: skip


def test_files_load_with_exact_counts_uploaded_with_the_job(
    bigquery_env: BigQueryEmulator,
    mixed_visits: tuple[Path, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
) -> None:
    path, expected = mixed_visits
    name = new_dataset("load")
    summary = clickflow_run(pipeline(load_pipeline(path, bigquery_env.project, name)))
    assert summary.rows == expected
    assert bigquery_env.counts(name) == expected


def test_staged_in_cloud_storage_and_loading_again_changes_no_count(
    bigquery_env: BigQueryEmulator,
    gcs_emulator: tuple[str, Path],
    mixed_visits: tuple[Path, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
) -> None:
    path, expected = mixed_visits
    name = new_dataset("load")
    # small batches: several jobs per table, each of which must be recognised on the second run
    staged = f", staging: gs://{STAGING_BUCKET}/clickflow, batch: {{max_rows: 500}}"
    text = load_pipeline(path, bigquery_env.project, name, staged)
    for stored_already in ({}, {"bigquery_load": expected["visits"]}):
        summary = clickflow_run(pipeline(text))
        assert summary.rows == expected
        assert bigquery_env.counts(name) == expected
        assert summary.stored_already == stored_already  # the second run's jobs were all done before
    staging = gcs_emulator[1] / STAGING_BUCKET / "clickflow"
    assert not list(staging.rglob("*.json"))  # staged files are removed once loaded


async def test_rows_a_load_job_refuses_go_to_dead_letter_and_the_rest_loads(bigquery_env: BigQueryEmulator) -> None:
    rows = visits_with_a_bad_event(4)
    assert rows.counts() == {"visits": 3, "events": 9, "purchase_items": 3, "dead_letter": 0}
    name = new_dataset("load")
    sink = BigQueryLoadSink("bq", BigQueryLoadOptions(project=bigquery_env.project, dataset=name))
    await write_one_batch(sink, rows)
    stored = await anyio.to_thread.run_sync(bigquery_env.counts, name)
    assert stored == {"visits": 3, "events": 8, "purchase_items": 3, "dead_letter": 1}
    (dead,) = await anyio.to_thread.run_sync(bigquery_env.query, f"SELECT * FROM `{name}.dead_letter`")
    assert dead["reason"] == "bigquery_rejected" and dead["message_id"] == rows.tables["events"][4][0]
    assert json.loads(dead["payload"])["event_index"] == "not a number"
