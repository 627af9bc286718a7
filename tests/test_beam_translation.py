"""How each source and sink becomes Beam transforms, what is refused, and what Dataflow is given.

Graphs are built, never run (``tests/test_beam.py`` runs pipelines); Dataflow
is never contacted.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from apache_beam.io.gcp.bigquery import BigQueryDisposition, WriteToBigQuery
from apache_beam.io.gcp.bigquery_tools import RetryStrategy
from apache_beam.io.gcp.pubsub import PubsubMessage, ReadFromPubSub
from apache_beam.pipeline import PipelineVisitor

from clickflow.beam.launch import BATCH_RUNNER, DATAFLOW_RUNNER, STREAMING_RUNNER, BeamError, Launch, prepare
from clickflow.config import parse_pipeline
from clickflow.plugins import Registry
from clickflow.schema import DEAD_LETTER, TABLES
from clickflow_bigquery.beam import refused_row
from clickflow_bigquery.tables import table_resource
from clickflow_file import each_file_once, expand_local
from clickflow_file.beam import match, read_file
from clickflow_pubsub.beam import message
from tests.conftest import REPO, VALID_VISIT
from tests.emulators import clickflow

SUBSCRIPTION = "projects/my-project/subscriptions/visits"
DATAFLOW = ["--project=my-project", "--region=europe-west1", "--temp_location=gs://my-bucket/tmp"]


@pytest.fixture
def launch(clickflow_registry: Registry) -> Callable[..., Launch]:
    """``prepare`` for pipeline YAML text."""

    def make(text: str, runner: str = "beam", flags: list[str] | None = None) -> Launch:
        return prepare(parse_pipeline(text, clickflow_registry, "p.yaml", {}), runner, flags or [])

    return make


def graph(launch: Launch) -> dict[str, Any]:
    """Every transform of the built pipeline by its full label, composites included."""
    found: dict[str, Any] = {}

    class Visitor(PipelineVisitor):  # type: ignore[misc]
        def enter_composite_transform(self, node: Any) -> None:
            self.visit_transform(node)

        def visit_transform(self, node: Any) -> None:
            found[node.full_label] = node.transform

    launch.build().visit(Visitor())
    return found


def of_kind(transforms: dict[str, Any], kind: type) -> list[Any]:
    return [t for t in transforms.values() if isinstance(t, kind)]


# sources


def test_file_patterns_are_matched_by_beam_as_absolute_paths(
    launch: Callable[..., Launch], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    built = launch("sources: [{type: file, path: [data/*.jsonl, 'gs://bkt/v/*.gz']}]\nsinks: [{type: duckdb}]")
    transforms = graph(built)
    assert list(transforms["Read file/Patterns"].values) == [str(tmp_path / "data/*.jsonl"), "gs://bkt/v/*.gz"]
    assert {"Read file/Match", "Read file/Each once", "Read file/Read", "Parse file"} <= set(transforms)
    assert "Read file/Spread batches" not in transforms  # only on Dataflow: locally it would hold them all
    assert built.runner == BATCH_RUNNER


def test_file_reading_gives_the_async_sources_ids(tmp_path: Path) -> None:
    lines, array, gz = tmp_path / "a.jsonl", tmp_path / "b.json", tmp_path / "c.jsonl.gz"
    lines.write_text('{"x": 1}\n\n{"x": 2}\n')
    array.write_text(json.dumps([{"x": 3}, {"x": 4}]))
    gz.write_bytes(gzip.compress(b'{"x": 5}\n'))
    assert list(read_file(str(lines), 1, 1 << 20)) == [[at(f"{lines}:1", b'{"x": 1}')], [at(f"{lines}:3", b'{"x": 2}')]]
    assert list(read_file(str(array), 10, 1 << 20)) == [
        [at(f"{array}:[0]", b'{"x": 3}'), at(f"{array}:[1]", b'{"x": 4}')]
    ]
    assert list(read_file(str(gz), 10, 1 << 20)) == [[at(f"{gz}:1", b'{"x": 5}')]]
    assert list(read_file(str(array), 10, 8)) == [[at(f"{array}:[0]", b'{"x": 3}')], [at(f"{array}:[1]", b'{"x": 4}')]]


def at(place: str, data: bytes) -> tuple[str, bytes]:
    """A file's message: its id is its place and 16 hex digits of its bytes' SHA-256."""
    return f"{place}#{hashlib.sha256(data).hexdigest()[:16]}", data


def test_patterns_match_as_in_the_async_source(tmp_path: Path) -> None:
    for name in ("top.jsonl", "a/one.jsonl", "a/b/two.jsonl", "a/skip.txt"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}")
    pattern = str(tmp_path / "**/*.jsonl")
    assert match(pattern) == expand_local(pattern)
    assert len(match(pattern)) == 3  # "**" also stands for no directory
    (tmp_path / "a" / "up").symlink_to("..")  # each file found again through it, under longer names
    assert each_file_once(match(pattern)) == expand_local(str(tmp_path / "**/*.jsonl"))[:3]
    with pytest.raises(FileNotFoundError):
        match(str(tmp_path / "*.nothing"))


def test_pubsub_pull_reads_the_subscription_in_streaming_mode(launch: Callable[..., Launch]) -> None:
    text = (
        f"sources: [{{type: pubsub_pull, subscription: '{SUBSCRIPTION}'}}]\n"
        "sinks: [{type: bigquery_streaming, project: my-project, dataset: clickstream}]"
    )
    built = launch(text)
    (read,) = of_kind(graph(built), ReadFromPubSub)
    assert read._source.full_subscription == SUBSCRIPTION
    assert read.with_attributes is True
    assert built.runner == STREAMING_RUNNER
    assert "--streaming" in launch(text, "dataflow", DATAFLOW).flags()
    assert message(PubsubMessage(b"{}", {}, message_id="123")) == [("123", b"{}")]


# sinks


@pytest.mark.parametrize("create_tables", [True, False])
def test_bigquery_load_writes_each_table_with_file_loads(create_tables: bool, launch: Callable[..., Launch]) -> None:
    text = (
        "sources: [{type: file, path: data}]\n"
        "sinks: [{type: bigquery_load, project: my-project, dataset: clickstream, table_prefix: cf_, "
        f"staging: 'gs://my-bucket/staging', create_tables: {str(create_tables).lower()}}}]"
    )
    writes = {w.table_reference.tableId: w for w in of_kind(graph(launch(text)), WriteToBigQuery)}

    assert sorted(writes) == sorted(f"cf_{t}" for t in TABLES)
    for name, table in TABLES.items():
        write = writes[f"cf_{name}"]
        resource = table_resource(table)
        assert (write.table_reference.projectId, write.table_reference.datasetId) == ("my-project", "clickstream")
        assert write.method == WriteToBigQuery.Method.FILE_LOADS
        assert write.schema == resource["schema"]
        assert write.additional_bq_parameters["timePartitioning"] == {"type": "DAY", "field": table.partition_by}
        assert write.additional_bq_parameters["clustering"] == {"fields": list(table.cluster_by)}
        assert write.custom_gcs_temp_location == "gs://my-bucket/staging"
        assert write.write_disposition == BigQueryDisposition.WRITE_APPEND
        expected = BigQueryDisposition.CREATE_IF_NEEDED if create_tables else BigQueryDisposition.CREATE_NEVER
        assert write.create_disposition == expected


def test_bigquery_load_on_a_stream_loads_every_max_age(launch: Callable[..., Launch]) -> None:
    text = (
        f"sources: [{{type: pubsub_pull, subscription: '{SUBSCRIPTION}'}}]\n"
        "sinks: [{type: bigquery_load, project: my-project, dataset: d, batch: {max_age: 5m}}]"
    )
    writes = of_kind(graph(launch(text, flags=["--temp_location=gs://my-bucket/tmp"])), WriteToBigQuery)
    assert [w.triggering_frequency for w in writes] == [300] * 4


def test_bigquery_streaming_sends_refused_rows_to_dead_letter(launch: Callable[..., Launch]) -> None:
    text = "sources: [{type: file, path: data}]\nsinks: [{type: bigquery_streaming, project: my-proj, dataset: d}]"
    transforms = graph(launch(text))
    writes = of_kind(transforms, WriteToBigQuery)
    assert len(writes) == 4
    assert {w.method for w in writes} == {WriteToBigQuery.Method.STREAMING_INSERTS}
    assert {w.insert_retry_strategy for w in writes} == {RetryStrategy.RETRY_ON_TRANSIENT_ERROR}
    sink = "Write bigquery_streaming"
    expected = {f"{sink}/Refused {t}" for t in ("visits", "events", "purchase_items")}
    assert expected | {f"{sink}/All dead letters", f"{sink}/Refused dead letters"} <= set(transforms)


def test_a_refused_row_becomes_a_dead_letter() -> None:
    row = {name: None for name in TABLES["events"].column_names} | {"visit_id": "v1", "event_index": 2}
    row["event_id"] = "v1:2"
    (refused,) = refused_row(("p:d.events", row, [{"message": "no"}]), "events", "bq")
    dead = dict(zip(DEAD_LETTER.column_names, refused, strict=True))
    assert dead["reason"] == "bigquery_rejected"
    assert dead["dead_letter_id"] == "events/v1:2"
    assert (dead["message_id"], dead["event_index"], dead["source"]) == ("v1:2", 2, "bq")
    assert dead["error"] == "events: no"
    assert json.loads(dead["payload"]) == row


def test_duckdb_writes_table_files_per_table(launch: Callable[..., Launch], tmp_path: Path) -> None:
    text = f"sources: [{{type: file, path: data}}]\nsinks: [{{type: duckdb, path: '{tmp_path / 'x.duckdb'}'}}]"
    assert {f"Write duckdb/Write {table}" for table in TABLES} <= set(graph(launch(text)))


# refusals


@pytest.mark.parametrize(
    ("text", "runner", "flags", "problem"),
    [
        (
            "sources: [{type: simulator, count: 1}]\nsinks: [{type: duckdb}]",
            "beam",
            [],
            "source 'simulator': type 'simulator' has no Beam translation; run it with --runner local",
        ),
        (
            "sources: [{type: pubsub_push, auth: none}]\nmonitor: {port: 0}\n"
            "sinks: [{type: bigquery_streaming, project: my-proj, dataset: d}]",
            "beam",
            [],
            "source 'pubsub_push': type 'pubsub_push' has no Beam translation; run it with --runner local",
        ),
        (
            "sources: [{type: file, path: x}]\nsinks: [{type: duckdb}]",
            "dataflow",
            DATAFLOW,
            "sink 'duckdb': duckdb writes a file on this machine; on Dataflow use bigquery_load or bigquery_streaming",
        ),
        (
            f"sources: [{{type: pubsub_pull, subscription: '{SUBSCRIPTION}'}}]\nsinks: [{{type: duckdb}}]",
            "beam",
            [],
            "sink 'duckdb': duckdb loads its files when a batch pipeline ends; a streaming source never ends",
        ),
        (
            "sources: [{type: file, path: x}]\nsinks: [{type: bigquery_load, project: my-proj, dataset: d}]",
            "beam",
            [],
            "sink 'bigquery_load': load jobs on Beam read their files from Cloud Storage: "
            "set staging: gs://... or --temp_location",
        ),
        (
            "sources: [{type: file, path: x.jsonl}]\nsinks: [{type: bigquery_load, project: my-proj, dataset: d}]",
            "dataflow",
            DATAFLOW,
            "source 'file': Dataflow's workers cannot read this machine's files (x.jsonl): use gs:// paths",
        ),
        (
            "sources: [{type: file, path: [x.jsonl, '-']}]\nsinks: [{type: duckdb}]",
            "beam",
            [],
            "source 'file': Beam reads files, not standard input ('-'): write it to a file, or run without --runner",
        ),
        ("sources: [{type: file, path: x}]\nsinks: [{type: duckdb}]", "beam", ["--no_such_option=1"],
         "unknown Beam option --no_such_option"),
        (
            "sources: [{type: file, path: x}]\nsinks: [{type: bigquery_streaming, project: my-proj, dataset: d}]",
            "dataflow",
            ["--temp_location=/tmp"],
            "Dataflow needs --project",
        ),
    ],
)  # fmt: skip
def test_refused_before_anything_runs(
    text: str, runner: str, flags: list[str], problem: str, launch: Callable[..., Launch]
) -> None:
    with pytest.raises(BeamError) as refused:
        launch(text, runner, flags)
    assert problem in refused.value.problems


def test_every_problem_is_reported_at_once(launch: Callable[..., Launch]) -> None:
    text = "sources: [{type: simulator, count: 1}]\nsinks: [{type: bigquery_streaming, project: my-proj, dataset: d}]"
    with pytest.raises(BeamError) as refused:
        launch(text, "dataflow", [])
    assert refused.value.problems == [
        "source 'simulator': type 'simulator' has no Beam translation; run it with --runner local",
        "Dataflow needs --project",
        "Dataflow needs --region",
        "Dataflow needs --temp_location gs://BUCKET/PATH",
    ]


# the Dataflow command line


def test_dataflow_flags_package_this_checkout_and_pass_options_through(launch: Callable[..., Launch]) -> None:
    text = "sources: [{type: file, path: 'gs://bkt/*'}]\nsinks: [{type: bigquery_load, project: my-proj, dataset: d}]"
    extra = ["--service_account_email=etl@my-project.iam.gserviceaccount.com", "--max_num_workers=20",
             "--machine_type=n2-standard-4", "--experiments=use_runner_v2"]  # fmt: skip
    built = launch(text, "dataflow", DATAFLOW + extra)
    assert built.runner == DATAFLOW_RUNNER
    assert sorted(built.flags()) == sorted(
        [*DATAFLOW, *extra, f"--runner={DATAFLOW_RUNNER}", f"--setup_file={REPO / 'pyproject.toml'}"]
    )


def test_a_dataflow_stream_or_template_is_left_running_and_a_batch_job_is_waited_for(
    launch: Callable[..., Launch],
) -> None:
    batch = "sources: [{type: file, path: 'gs://bkt/*'}]\nsinks: [{type: bigquery_load, project: my-proj, dataset: d}]"
    stream = f"sources: [{{type: pubsub_pull, subscription: {SUBSCRIPTION}}}]\n" + batch.split("\n")[1]
    template = "--template_location=gs://my-bucket/templates/job.json"  # what a Flex Template's launcher adds
    assert not launch(batch, "dataflow", DATAFLOW).detached
    assert launch(batch, "dataflow", [*DATAFLOW, template]).detached
    assert launch(stream.replace("bigquery_load", "bigquery_streaming"), "dataflow", DATAFLOW).detached
    local = "sources: [{type: file, path: x.jsonl}]\nsinks: [{type: duckdb, path: x.duckdb}]"
    assert not launch(local, "beam", [template]).detached


def test_a_package_given_by_the_user_is_kept(launch: Callable[..., Launch]) -> None:
    text = "sources: [{type: file, path: 'gs://bkt/*'}]\nsinks: [{type: bigquery_load, project: my-proj, dataset: d}]"
    flags = launch(text, "dataflow", [*DATAFLOW, "--extra_package=/dist/clickflow-0.1.0-py3-none-any.whl"]).flags()
    assert (
        "--extra_package=/dist/clickflow-0.1.0-py3-none-any.whl" in flags
        or "--extra_packages=/dist/clickflow-0.1.0-py3-none-any.whl" in flags
    )
    assert not any(f.startswith("--setup_file") for f in flags)


def test_dry_run_prints_the_dataflow_job_and_submits_nothing() -> None:
    env = {"PROJECT_ID": "my-project", "CLICKFLOW_INPUT": "gs://my-bucket/visits/*.jsonl.gz"}
    result = clickflow("run", "config/batch.yaml", "--runner", "dataflow", "--dry-run", *DATAFLOW, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "source file: ReadFiles",
        "sink bigquery_load: WriteBigQuery",
        f"runner {DATAFLOW_RUNNER}: --project=my-project --region=europe-west1 --runner=DataflowRunner "
        f"--setup_file={REPO / 'pyproject.toml'} --temp_location=gs://my-bucket/tmp",
    ]


def test_refusals_exit_2_with_file_and_reason() -> None:
    result = clickflow("run", "config/local.yaml", "--runner", "beam")
    assert result.returncode == 2
    assert "config/local.yaml: source 'simulator': type 'simulator' has no Beam translation" in result.stderr


def test_beam_flags_without_a_beam_runner_are_a_usage_error() -> None:
    result = clickflow("run", "config/files.yaml", "--direct_num_workers=2")
    assert result.returncode == 2
    assert "--direct_num_workers=2: Beam options need --runner beam or --runner dataflow" in result.stderr


def test_the_sdist_dataflow_builds_holds_clickflow_and_its_plugins(tmp_path: Path) -> None:
    """What Beam does with --setup_file: ``python -m build --sdist --no-isolation`` of the checkout."""
    build = [sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(tmp_path), str(REPO)]
    subprocess.run(build, check=True, capture_output=True, timeout=300)
    (sdist,) = tmp_path.glob("clickflow-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.partition("/")[2] for name in archive.getnames()}
    plugins = [f"plugins/clickflow_{name}/beam.py" for name in ("file", "duckdb", "pubsub", "bigquery")]
    for module in ("pyproject.toml", "clickflow/beam/transforms.py", "clickflow/parser.py", *plugins):
        assert module in names


def test_worker_code_imports_without_the_gcp_extra() -> None:
    """Dataflow's workers install clickflow's core dependencies only: no gcloud-aio, no PyJWT."""
    code = (
        "import sys; sys.modules['gcloud'] = sys.modules['jwt'] = None\n"
        "import clickflow_bigquery.beam, clickflow_pubsub.beam, clickflow_file.beam, clickflow_duckdb.beam\n"
        "from clickflow.beam import ParseVisits; import pickle; pickle.dumps(ParseVisits('s'))"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_parse_visits_tags_every_table() -> None:
    from clickflow.beam import ParseVisits

    parse = ParseVisits("s")
    parse.setup()
    bad_event = {**VALID_VISIT, "events": [*VALID_VISIT["events"], {"event_type": "nope"}]}
    batch = [("m1", json.dumps(bad_event).encode()), ("m2", b"not json")]
    outputs = {out.tag: out.value for out in parse.process(batch)}
    assert {table: len(rows) for table, rows in outputs.items()} == {
        "visits": 1, "events": 3, "purchase_items": 1, "dead_letter": 2,
    }  # fmt: skip
