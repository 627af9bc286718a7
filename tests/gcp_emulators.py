"""The BigQuery and Cloud Storage emulators, started and stopped by the tests themselves.

BigQuery: the ``bqemulator`` package, in a virtual environment of its own under
``.emulators/`` (created on first use from ``tests/bigquery-emulator.txt``, or
taken from ``CLICKFLOW_BQEMULATOR``), since its DuckDB extensions pin a DuckDB
version of their own. Cloud Storage: ``gcp-storage-emulator`` from the dev
extra, keeping objects on disk where the BigQuery emulator reads ``gs://`` URIs.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from clickflow.api import AnySink, Message, RowBatch, SinkBatch
from clickflow.config import parse_pipeline
from clickflow.parser import VisitParser
from clickflow.plugins import load_plugins
from clickflow.runtime import Runtime
from clickflow.schema import EventCol
from clickflow_bigquery.client import BigQueryClient
from clickflow_simulator import VisitGenerator
from tests.conftest import FIXTURES, VALID_VISIT, files_into, table_counts
from tests.emulators import REPO, free_port, listening, missing, wait_for

BQEMULATOR_VENV = REPO / ".emulators" / "bqemulator"
REQUIREMENTS = Path(__file__).with_name("bigquery-emulator.txt")
PROJECT = "clickflow-test"
STAGING_BUCKET = "clickflow-staging"


def bqemulator() -> Path | None:
    """The ``bqemulator`` launcher, installed into ``.emulators/`` if need be; None if that fails."""
    given = os.environ.get("CLICKFLOW_BQEMULATOR")
    if given:
        return Path(given)
    launcher = BQEMULATOR_VENV / "bin" / "bqemulator"
    if not launcher.exists():
        python = BQEMULATOR_VENV / "bin" / "python"
        try:
            subprocess.run([sys.executable, "-m", "venv", str(BQEMULATOR_VENV)], check=True, timeout=120)
            subprocess.run(
                [str(python), "-m", "pip", "install", "--quiet", "-r", str(REQUIREMENTS)],
                check=True, timeout=900, capture_output=True,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            return None
    # Offline, DuckDB takes its extensions from these packages, copied once into ~/.duckdb.
    script = "import duckdb_extensions as e; e.import_extension('spatial'); e.import_extension('avro')"
    subprocess.run([str(launcher.with_name("python")), "-c", script], check=True, timeout=300)
    return launcher


class BigQueryEmulator:
    """A running emulator: its REST and gRPC (Write API) hosts, and a client for checking what the sinks wrote."""

    def __init__(self, host: str, grpc_host: str) -> None:
        self.host = host
        self.grpc_host = grpc_host
        self.project = PROJECT

    def query(self, sql: str) -> list[dict[str, Any]]:
        async def run() -> list[dict[str, Any]]:
            async with BigQueryClient(self.project) as client:
                return await client.query(sql)

        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("BIGQUERY_EMULATOR_HOST", self.host)
            return anyio.run(run)

    def counts(self, dataset: str) -> dict[str, int]:
        tables = ("visits", "events", "purchase_items", "dead_letter")
        sql = " UNION ALL ".join(f"SELECT '{t}' AS t, COUNT(*) AS n FROM `{dataset}.{t}`" for t in tables)
        return {row["t"]: int(row["n"]) for row in self.query(sql)}


@contextmanager
def running_bigquery_emulator(launcher: Path, log: Path, gcs_root: Path) -> Iterator[BigQueryEmulator]:
    port, grpc_port = free_port(), free_port()
    command = [str(launcher), "start", "--rest-port", str(port), "--grpc-port", str(grpc_port),
               "--project", PROJECT, "--log-level", "warning"]  # fmt: skip
    with listening(command, port, log, {"BQEMU_GCS_LOCAL_ROOT": str(gcs_root)}):
        wait_for(lambda: _accepts(grpc_port), 30)
        yield BigQueryEmulator(f"127.0.0.1:{port}", f"127.0.0.1:{grpc_port}")


def _accepts(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


@contextmanager
def running_gcs_emulator(data: Path, log: Path) -> Iterator[str]:
    """gcp-storage-emulator keeping objects under ``data/.cloudstorage/BUCKET/NAME``; yields its URL.
    It has one bucket, STAGING_BUCKET."""
    port = free_port()
    command = [sys.executable, "-m", "gcp_storage_emulator", "start", "--port", str(port), "--quiet",
               "--default-bucket", STAGING_BUCKET]  # fmt: skip
    with listening(command, port, log, {"STORAGE_BASE": str(data)}):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Its URL (for ``STORAGE_EMULATOR_HOST``) and the directory its buckets live in."""
    data = tmp_path_factory.mktemp("gcs")
    with running_gcs_emulator(data, data / "emulator.log") as url:
        yield url, data / ".cloudstorage"


@pytest.fixture(scope="session")
def bigquery_emulator(
    tmp_path_factory: pytest.TempPathFactory, gcs_emulator: tuple[str, Path]
) -> Iterator[BigQueryEmulator]:
    launcher = bqemulator()
    if launcher is None:
        missing("the BigQuery emulator", f"pip install -r {REQUIREMENTS} into {BQEMULATOR_VENV} failed")
    log = tmp_path_factory.mktemp("bigquery") / "emulator.log"
    with running_bigquery_emulator(launcher, log, gcs_emulator[1]) as emulator:  # type: ignore[arg-type]
        yield emulator


@pytest.fixture
def bigquery_env(
    bigquery_emulator: BigQueryEmulator, gcs_emulator: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> BigQueryEmulator:
    """Point this test's clients (and clickflow processes it starts) at the emulators."""
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", bigquery_emulator.host)
    monkeypatch.setenv("BIGQUERY_STORAGE_EMULATOR_HOST", bigquery_emulator.grpc_host)
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator[0])
    return bigquery_emulator


def new_dataset(prefix: str) -> str:
    """A dataset no other test writes (one emulator serves the whole session)."""
    return f"{prefix}_{next(_datasets)}"


_datasets = itertools.count()


def duckdb_counts(path: str | Path, db: Path) -> dict[str, int]:
    """What the DuckDB sink stores for these files: what the BigQuery sinks must match."""
    text = files_into(path, f"type: duckdb, path: '{db}'")
    anyio.run(Runtime(parse_pipeline(text, load_plugins(), "expected.yaml", {})).run)
    return table_counts(db)


@pytest.fixture(scope="session")
def mixed_visits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int]]:
    """A file of 400 simulated visits, a tenth malformed, plus the real sample; and its expected rows."""
    directory = tmp_path_factory.mktemp("mixed")
    path = directory / "visits.jsonl"
    lines = list(VisitGenerator(seed=11, malformed_rate=0.1).messages(400))
    path.write_bytes(b"\n".join(lines) + b"\n" + (FIXTURES / "challenge_sample.jsonl").read_bytes())
    counts = duckdb_counts(path, directory / "expected.duckdb")
    assert all(counts.values()), counts
    return path, counts


def visits_with_a_bad_event(event: int) -> RowBatch:
    """Three valid visits, parsed; then one ``events`` row is spoiled so that BigQuery refuses it."""
    messages = [Message(json.dumps(VALID_VISIT).encode(), f"m{i}") for i in range(3)]
    rows = VisitParser().parse(messages, "test", 1_719_824_400_000_000)
    bad = list(rows.tables["events"][event])
    bad[EventCol.event_index] = "not a number"
    rows.tables["events"][event] = tuple(bad)
    return rows


async def write_one_batch(sink: AnySink, rows: RowBatch) -> SinkBatch:
    """Open the sink, write ``rows`` as one batch, close it; the batch is returned for its counts."""
    await sink.open()
    try:
        batch = sink.new_batch()
        batch.add(rows)
        await sink.write(batch)
    finally:
        await sink.close()
    return batch


def upload(gcs_url: str, objects: dict[str, bytes], bucket: str = STAGING_BUCKET) -> None:
    """Put objects into the Cloud Storage emulator."""
    from gcloud.aio.storage import Storage

    async def run() -> None:
        async with Storage(api_root=gcs_url) as storage:
            for name, data in objects.items():
                await storage.upload(bucket, name, data, content_type="application/octet-stream")

    anyio.run(run)
