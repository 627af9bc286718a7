"""The example streaming pipeline, unchanged, between real emulators:
Pub/Sub emulator -> ``clickflow run config/pull.yaml`` -> BigQuery emulator. And ``clickflow bigquery
create-tables``, which prepares a pipeline's tables or reports how existing ones differ."""

from __future__ import annotations

import signal
import time

import anyio
import pytest

from clickflow.schema import EVENTS
from clickflow_bigquery.client import BigQueryClient
from clickflow_bigquery.tables import table_resource
from tests.emulators import PubSubEmulator, clickflow, free_port, metric, start_clickflow, wait_for
from tests.gcp_emulators import BigQueryEmulator

pytestmark = pytest.mark.integration


def test_pull_pipeline_counts_exactly_from_pubsub_to_bigquery(
    pubsub_emulator: PubSubEmulator, bigquery_env: BigQueryEmulator
) -> None:
    subscription, expected = pubsub_emulator.published_visits("end-to-end", 3000, seed=8)
    port = free_port()
    env = {
        "PROJECT_ID": pubsub_emulator.project,
        "SUBSCRIPTION": subscription.rsplit("/", 1)[1],
        "DATASET": "end_to_end",
        "MONITOR_HOST": "127.0.0.1",
        "PORT": str(port),
    }
    assert pubsub_emulator.project == bigquery_env.project
    process = start_clickflow("config/pull.yaml", pubsub_emulator.host, env)
    try:
        wait_for(lambda: metric(port, "clickflow_messages_acknowledged_total") >= 3000, 120)
        time.sleep(1)  # anything redelivered would arrive now
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, stderr

    assert bigquery_env.counts("end_to_end") == expected


def test_create_tables_is_idempotent_and_reports_a_differing_schema(bigquery_env: BigQueryEmulator) -> None:
    env = {"PROJECT_ID": bigquery_env.project, "DATASET": "created", "PUSH_AUDIENCE": "x", "PUSH_SERVICE_ACCOUNT": "y"}
    for _ in range(2):
        result = clickflow("bigquery", "create-tables", "config/batch.yaml", env=env)
        assert result.returncode == 0, result.stderr
        assert f"{bigquery_env.project}.created is ready" in result.stdout
    tables = bigquery_env.query("SELECT table_name FROM `created.INFORMATION_SCHEMA.TABLES` ORDER BY table_name")
    assert [t["table_name"] for t in tables] == ["dead_letter", "events", "purchase_items", "visits"]

    async def make_a_differing_events_table() -> None:
        resource = table_resource(EVENTS)
        fields = [f for f in resource["schema"]["fields"] if f["name"] != "referrer_url"]  # nullable: added
        resource["schema"]["fields"] = [{**f, "type": "STRING"} if f["name"] == "price" else f for f in fields]
        async with BigQueryClient(bigquery_env.project) as client:
            await client.create_dataset("differs")
            await client.create_table("differs", "events", resource)

    anyio.run(make_a_differing_events_table)
    result = clickflow("bigquery", "create-tables", "config/batch.yaml", env={**env, "DATASET": "differs"})
    assert result.returncode == 1
    assert f"{bigquery_env.project}.differs.events: column price is STRING, clickflow writes FLOAT" in result.stderr
    assert "referrer_url" not in result.stderr
    # the missing nullable column was added: selecting it works (an unknown column is a query error)
    assert bigquery_env.query("SELECT referrer_url FROM `differs.events` LIMIT 0") == []
