"""Without Google credentials, a command on Google Cloud's services stops at its start and says what
to set, where every call failed with "Cannot connect to host metadata.google.internal" (and a pull
source retried that forever). Real processes, with no key, no application default credentials and
a metadata server address where nothing listens."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.emulators import CLICKFLOW, free_port
from tests.gcp_emulators import BigQueryEmulator

PIPELINES = {
    "pubsub_pull": (
        "sources: [{type: pubsub_pull, subscription: projects/demo/subscriptions/clicks}]\n"
        "sinks: [{type: duckdb, path: 'DB'}]\n",
        "PUBSUB_EMULATOR_HOST",
    ),
    "bigquery_streaming": (
        "sources: [{type: simulator, count: 10}]\nsinks: [{type: bigquery_streaming, project: demo, dataset: web}]\n",
        "BIGQUERY_EMULATOR_HOST",
    ),
    "file from gs://": (
        "sources: [{type: file, path: 'gs://clicks/visits.jsonl'}]\nsinks: [{type: duckdb, path: 'DB'}]\n",
        "STORAGE_EMULATOR_HOST",
    ),
}


def without_credentials(home: Path) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.endswith("_EMULATOR_HOST") and name not in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG")
    }
    return {**env, "HOME": str(home), "GCE_METADATA_HOST": f"127.0.0.1:{free_port()}"}


def assert_says_what_to_set(result: subprocess.CompletedProcess[str], variable: str) -> None:
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "cannot get a Google access token" in last, last
    assert "GOOGLE_APPLICATION_CREDENTIALS" in last and variable in last, last


@pytest.mark.parametrize("case", PIPELINES)
def test_a_run_without_credentials_stops_at_start_saying_what_to_set(tmp_path: Path, case: str) -> None:
    text, variable = PIPELINES[case]
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(text.replace("DB", str(tmp_path / "out.duckdb")))
    started = time.monotonic()
    result = subprocess.run([*CLICKFLOW, "run", str(pipeline), "--no-progress"], capture_output=True, text=True,
                            timeout=120, cwd=REPO, env=without_credentials(tmp_path))  # fmt: skip
    assert_says_what_to_set(result, variable)
    assert time.monotonic() - started < 60


def test_publishing_without_credentials_says_what_to_set(tmp_path: Path) -> None:
    result = subprocess.run([*CLICKFLOW, "simulate", "--count", "10", "--topic", "projects/demo/topics/clicks"],
                            capture_output=True, text=True, timeout=120, cwd=REPO,
                            env=without_credentials(tmp_path))  # fmt: skip
    assert_says_what_to_set(result, "PUBSUB_EMULATOR_HOST")


@pytest.mark.parametrize("command", [["bigquery", "create-tables"], ["dlq", "list"]], ids=" ".join)
def test_a_bigquery_command_without_credentials_says_what_to_set_in_one_line(
    tmp_path: Path, command: list[str]
) -> None:
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(PIPELINES["bigquery_streaming"][0])
    result = subprocess.run([*CLICKFLOW, *command, str(pipeline)], capture_output=True, text=True, timeout=120,
                            cwd=REPO, env=without_credentials(tmp_path))  # fmt: skip
    assert_says_what_to_set(result, "BIGQUERY_EMULATOR_HOST")
    assert "Traceback" not in result.stderr, result.stderr


def test_staging_without_credentials_for_cloud_storage_stops_the_load_sink_at_start(
    tmp_path: Path, bigquery_emulator: BigQueryEmulator
) -> None:
    """BigQuery on its emulator, the staging bucket on Google's Cloud Storage, with no credentials."""
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text(
        "sources: [{type: simulator, count: 10}]\n"
        f"sinks: [{{type: bigquery_load, project: {bigquery_emulator.project}, dataset: staged,"
        " staging: 'gs://clicks/staging'}]\n"
    )
    env = {**without_credentials(tmp_path), "BIGQUERY_EMULATOR_HOST": bigquery_emulator.host}
    result = subprocess.run([*CLICKFLOW, "run", str(pipeline), "--no-progress"], capture_output=True, text=True,
                            timeout=120, cwd=REPO, env=env)  # fmt: skip
    assert_says_what_to_set(result, "STORAGE_EMULATOR_HOST")
    assert "sink 'bigquery_load' could not start" in result.stderr
