"""``gs://`` input for the ``file`` source, against a Cloud Storage emulator; and the batch pipeline
(``config/batch.yaml``: Cloud Storage -> load jobs -> BigQuery) end to end."""

from __future__ import annotations

import fnmatch
import gzip
from collections.abc import Callable
from pathlib import Path

import pytest

from clickflow.config import Pipeline
from clickflow.runtime import SourceFailed
from clickflow.summary import RunSummary
from clickflow_file.globs import matches
from tests.conftest import files_into, table_counts
from tests.emulators import clickflow
from tests.gcp_emulators import STAGING_BUCKET, BigQueryEmulator, duckdb_counts, upload

pytestmark = pytest.mark.integration


def test_globs_match_like_local_ones() -> None:
    pattern = "in/day=*/visits-??.jsonl*"
    assert matches(pattern, "in/day=1/visits-01.jsonl.gz")
    assert not matches(pattern, "in/day=1/deeper/visits-01.jsonl")  # * stays within a segment
    assert matches("in/**/*.gz", "in/a/b/c.gz")
    assert not matches("in/*.gz", "in/a.gz.tmp")
    assert matches("in/**/*.gz", "in/c.gz") and matches("in/day=[0-9]/*", "in/day=7/x")
    assert matches("**/a/**/b/**", "a/b") and matches("**/a/**/b/**", "x/a/y/z/b/w")
    assert not matches("**/a/**/b/**", "b/a") and not matches("**/a/**/b/**", "x/a/y/z")


def test_a_pattern_of_many_double_stars_matches_in_steps_bounded_by_its_parts_and_the_names_segments(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each way of splitting the name among the ``**`` was tried afresh: seven of them took 50 s of
    the event loop for one 40-segment name, five 1.1 s (nine, growing alike, over half an hour)."""
    calls = 0
    fnmatchcase = fnmatch.fnmatchcase

    def counted(name: str, pattern: str) -> bool:
        nonlocal calls
        calls += 1
        return fnmatchcase(name, pattern)

    monkeypatch.setattr(fnmatch, "fnmatchcase", counted)
    name = "/".join(["a"] * 40 + ["y.json"])
    assert not matches("/".join(["**"] * 9 + ["x.json"]), name)
    assert matches("/".join(["**"] * 9 + ["y.json"]), name)
    assert calls <= 2 * 41  # each segment tried once against the last part, in each call


@pytest.fixture(scope="module")
def gcs_input(
    gcs_emulator: tuple[str, Path], mixed_visits: tuple[Path, dict[str, int]], tmp_path_factory: pytest.TempPathFactory
) -> tuple[str, dict[str, int]]:
    """Visits as objects of three formats (lines, gzip'd lines, an array); the pattern naming them,
    and the rows the same files give when read from local disk."""
    path, _ = mixed_visits
    lines = path.read_bytes().splitlines()
    third = len(lines) // 3
    valid = [line for line in lines[2 * third :] if line.startswith(b"{") and line.endswith(b"}")]
    objects = {
        "input/a.jsonl": b"\n".join(lines[:third]) + b"\n",
        "input/b.jsonl.gz": gzip.compress(b"\n".join(lines[third : 2 * third]) + b"\n"),
        "input/c.json": b"[" + b",".join(valid) + b"]",  # an array ends at a syntax error: keep it whole
    }
    upload(gcs_emulator[0], {**objects, "input/elsewhere/ignored.jsonl": b"not matched\n"})
    local = tmp_path_factory.mktemp("gcs-input")
    for name, data in objects.items():
        (local / name).parent.mkdir(exist_ok=True)
        (local / name).write_bytes(data)
    db = local / "expected.duckdb"
    return f"gs://{STAGING_BUCKET}/input/*.json*", duckdb_counts(f"{local}/input/*.json*", db)


def test_objects_stream_in_like_local_files(
    bigquery_env: BigQueryEmulator,
    gcs_input: tuple[str, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
    tmp_path: Path,
) -> None:
    pattern, expected = gcs_input
    db = tmp_path / "gcs.duckdb"
    summary = clickflow_run(pipeline(files_into(pattern, f"type: duckdb, path: '{db}'")))
    assert summary.rows == table_counts(db) == expected
    assert expected["visits"] > 300 and expected["dead_letter"] > 0


def test_an_unmatched_gs_pattern_fails_the_run(
    bigquery_env: BigQueryEmulator,
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
    tmp_path: Path,
) -> None:
    with pytest.raises(SourceFailed, match="no object matches"):
        clickflow_run(
            pipeline(
                files_into(f"gs://{STAGING_BUCKET}/nothing-*.jsonl", f"type: duckdb, path: '{tmp_path / 'x.duckdb'}'")
            )
        )


def test_the_batch_pipeline_loads_cloud_storage_files_into_bigquery(
    bigquery_env: BigQueryEmulator, gcs_input: tuple[str, dict[str, int]]
) -> None:
    pattern, expected = gcs_input
    env = {"PROJECT_ID": bigquery_env.project, "DATASET": "batch_pipeline", "CLICKFLOW_INPUT": pattern}
    result = clickflow("run", "config/batch.yaml", env=env)
    assert result.returncode == 0, result.stderr
    assert bigquery_env.counts("batch_pipeline") == expected
