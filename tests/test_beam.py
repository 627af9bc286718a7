"""The same pipeline file on Beam's local runner: exactly the async runtime's rows."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import re
from pathlib import Path

import duckdb
import pytest

from clickflow.beam.launch import prepare
from clickflow.config import parse_pipeline
from clickflow.plugins import Registry
from clickflow.schema import TABLE_NAMES
from clickflow.testing import run_pipeline
from clickflow_duckdb.tables import MissingTables
from clickflow_simulator.generator import VisitGenerator
from tests.conftest import FIXTURES, files_into, table_counts
from tests.emulators import clickflow
from tests.gcp_emulators import STAGING_BUCKET, upload

pytestmark = pytest.mark.integration

WALL_CLOCK = {"ingested_at", "received_at"}
"""Columns that hold the time of the run, which two runs cannot share."""


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """JSON lines (a tenth malformed), JSON arrays (one cut short, one on one line with an
    unescaped quote in a visit), files in gzip, bzip2 and xz, a UTF-16 one and the real sample."""
    directory = tmp_path_factory.mktemp("beam-input")
    generator = VisitGenerator(seed=5, malformed_rate=0.1)
    (directory / "visits.jsonl").write_bytes(b"\n".join(generator.messages(300)) + b"\n")
    (directory / "array.json").write_text(json.dumps(list(VisitGenerator(seed=6).visits(40))))
    (directory / "broken.json").write_text(json.dumps(list(VisitGenerator(seed=8).visits(3)))[:-40])  # cut short
    (directory / "more.jsonl.gz").write_bytes(gzip.compress(b"\n".join(VisitGenerator(seed=7).messages(60))))
    (directory / "more.jsonl.bz2").write_bytes(bz2.compress(b"\n".join(VisitGenerator(seed=11).messages(30))))
    (directory / "more.jsonl.xz").write_bytes(lzma.compress(b"\n".join(VisitGenerator(seed=12).messages(30))))
    quoted = [json.dumps(visit) for visit in VisitGenerator(seed=9).visits(10)]
    quoted[4] = quoted[4].replace('"session_id": "', '"session_id": ""', 1)
    (directory / "quoted.json").write_text("[" + ", ".join(quoted) + "]")
    windows = "".join(json.dumps(visit) + "\r\n" for visit in VisitGenerator(seed=10).visits(20))
    (directory / "windows.jsonl").write_text(windows, encoding="utf-16")
    (directory / "sample.jsonl").write_bytes((FIXTURES / "challenge_sample.jsonl").read_bytes())
    return directory


def rows(database: Path) -> dict[str, list[tuple[object, ...]]]:
    """Every table's rows, sorted, without the wall-clock columns."""
    found = {}
    with duckdb.connect(str(database), read_only=True) as con:
        for table in TABLE_NAMES:
            columns = [r[0] for r in con.execute(f"DESCRIBE {table}").fetchall() if r[0] not in WALL_CLOCK]
            found[table] = con.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY ALL").fetchall()
    return found


@pytest.fixture(scope="module")
def local_rows(inputs: Path, tmp_path_factory: pytest.TempPathFactory, clickflow_registry: Registry) -> dict:
    database = tmp_path_factory.mktemp("local") / "local.duckdb"
    text = files_into(inputs / "*", f"type: duckdb, path: '{database}'")
    run_pipeline(parse_pipeline(text, clickflow_registry, "local.yaml", {}))
    found = rows(database)
    assert all(found.values()), {t: len(r) for t, r in found.items()}
    return found


@pytest.mark.parametrize(
    "flags",
    [[], ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]],
    ids=["in-process", "two-processes"],
)
def test_beam_writes_exactly_the_rows_of_the_async_runtime(
    flags: list[str], inputs: Path, local_rows: dict, tmp_path: Path, clickflow_registry: Registry
) -> None:
    database = tmp_path / "beam.duckdb"
    text = files_into(inputs / "*", f"type: duckdb, path: '{database}'")
    summary = prepare(parse_pipeline(text, clickflow_registry, "beam.yaml", {}), "beam", flags).run()

    assert rows(database) == local_rows
    assert summary is not None
    assert {table: summary.rows[table] for table in TABLE_NAMES} == {t: len(r) for t, r in local_rows.items()}
    assert summary.messages["file"] == 300 + 40 + 3 + 60 + 30 + 30 + 10 + 20 + 1  # the cut array: 2 visits + its rest
    assert sum(summary.dead_letters.values()) == len(local_rows["dead_letter"])
    assert not (tmp_path / "beam.duckdb.spool").exists()


def test_a_second_beam_run_adds_nothing(inputs: Path, tmp_path: Path, clickflow_registry: Registry) -> None:
    database = tmp_path / "beam.duckdb"
    text = files_into(inputs / "sample.jsonl", f"type: duckdb, path: '{database}'")
    runs = [prepare(parse_pipeline(text, clickflow_registry, "beam.yaml", {}), "beam", []).run() for _ in range(2)]
    assert table_counts(database) == {"visits": 1, "events": 10, "purchase_items": 3, "dead_letter": 0}
    assert [run.stored_already for run in runs if run] == [{}, {"duckdb": 1}]  # the summary says so


def test_command_line_runs_config_files_on_beam(inputs: Path, tmp_path: Path) -> None:
    database = tmp_path / "cli.duckdb"
    env = {"CLICKFLOW_INPUT": str(inputs / "sample.jsonl"), "CLICKFLOW_DUCKDB": str(database)}
    result = clickflow("run", "config/files.yaml", "--runner", "beam", env=env)
    assert result.returncode == 0, result.stderr
    assert re.search(r"^  events +10$", result.stdout, re.MULTILINE), result.stdout
    assert table_counts(database)["events"] == 10


def test_a_broken_file_fails_the_command_in_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "cut.jsonl.gz"
    broken.write_bytes(gzip.compress(b"\n".join(VisitGenerator(seed=3).messages(50)))[:200])
    env = {"CLICKFLOW_INPUT": str(broken), "CLICKFLOW_DUCKDB": str(tmp_path / "cli.duckdb")}
    result = clickflow("run", "config/files.yaml", "--runner", "beam", env=env)
    assert result.returncode == 1
    last = result.stderr.splitlines()[-1]
    assert re.match(rf"clickflow: the pipeline failed on Beam \(\w+\): {broken}: unreadable after 0 messages: ", last)


def test_without_create_tables_a_missing_table_stops_the_run_before_it_starts(
    tmp_path: Path, clickflow_registry: Registry
) -> None:
    """It was found by the load that ends the run, after all the work."""
    database = tmp_path / "other.duckdb"
    with duckdb.connect(str(database)) as con:
        con.execute("CREATE TABLE orders (id INTEGER)")
    source = tmp_path / "visits.jsonl"
    source.write_bytes(b"\n".join(VisitGenerator(seed=4).messages(5)))
    text = files_into(source, f"type: duckdb, path: '{database}', create_tables: false")
    launch = prepare(parse_pipeline(text, clickflow_registry, "beam.yaml", {}), "beam", [])
    with pytest.raises(MissingTables, match="lacks table\\(s\\) visits, events, purchase_items, dead_letter"):
        launch.run()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.duckdb", "visits.jsonl"]


@pytest.fixture
def beam_storage(gcs_emulator: tuple[str, Path], monkeypatch: pytest.MonkeyPatch) -> str:
    """Both runtimes' Cloud Storage clients pointed at the emulator; its URL.

    Beam's client is given no credentials, as the emulator expects: this machine has no Application
    Default Credentials, and Beam would search for them for about a minute before going anonymous.
    """
    from apache_beam.internal.gcp import auth

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs_emulator[0])
    monkeypatch.setattr(auth._Credentials, "_credentials_init", True)
    monkeypatch.setattr(auth._Credentials, "_credentials", None)
    return gcs_emulator[0]


def test_beam_reads_cloud_storage_like_the_async_source(
    beam_storage: str, inputs: Path, tmp_path: Path, clickflow_registry: Registry
) -> None:
    objects = {
        "beam/visits.jsonl": (inputs / "visits.jsonl").read_bytes(),  # ** below matches no directory too
        "beam/day=2/array.json": (inputs / "array.json").read_bytes(),
        "beam/day=2/more.jsonl.gz": (inputs / "more.jsonl.gz").read_bytes(),
        "beam/day=2/notes.txt": b"not matched",
    }
    upload(beam_storage, objects)
    pattern = f"gs://{STAGING_BUCKET}/beam/**/*.json*"
    databases = {"local": tmp_path / "local.duckdb", "beam": tmp_path / "beam.duckdb"}
    pipelines = {
        name: parse_pipeline(files_into(pattern, f"type: duckdb, path: '{db}'"), clickflow_registry, "gs.yaml", {})
        for name, db in databases.items()
    }
    run_pipeline(pipelines["local"])
    summary = prepare(pipelines["beam"], "beam", []).run()

    assert summary is not None and summary.messages["file"] == 300 + 40 + 60
    assert rows(databases["beam"]) == rows(databases["local"])
    assert table_counts(databases["beam"])["visits"] > 300


def test_unmatched_pattern_fails_the_run(tmp_path: Path, clickflow_registry: Registry) -> None:
    text = files_into(tmp_path / "nothing-*.jsonl", f"type: duckdb, path: '{tmp_path / 'x.duckdb'}'")
    with pytest.raises(Exception, match="nothing-"):
        prepare(parse_pipeline(text, clickflow_registry, "beam.yaml", {}), "beam", []).run()
