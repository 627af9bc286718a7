"""Pipeline files: typed validation with FILE:LINE errors, env interpolation, examples."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import msgspec
import pytest

from clickflow.config import ConfigError, Pipeline, load_pipeline, parse_pipeline
from clickflow.options import BatchLimits
from clickflow.plugins import Registry
from clickflow_duckdb import DuckDBSinkOptions
from tests.conftest import REPO

MINIMAL = """\
sources:
  - type: simulator
    count: 10
sinks:
  - type: duckdb
    path: out.duckdb
"""


def problems(registry: Registry, text: str, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_pipeline(text, registry, "p.yaml", environ or {})
    return [str(p) for p in caught.value.problems]


def test_minimal_pipeline_is_typed(pipeline: Callable[..., Pipeline]) -> None:
    loaded = pipeline(MINIMAL)
    (source,), (sink,) = loaded.sources, loaded.sinks
    assert (source.name, source.options.count) == ("simulator", 10)  # type: ignore[attr-defined]
    assert sink.options.path == "out.duckdb"  # type: ignore[attr-defined]
    assert loaded.monitor is None


def test_unknown_plugin_type_lists_the_known_ones(registry: Registry) -> None:
    text = MINIMAL.replace("type: simulator", "type: kafka")
    assert problems(registry, text) == [
        "p.yaml:2: sources[0].type: unknown source type 'kafka'; "
        "known source types: file, pubsub_pull, pubsub_push, simulator"
    ]


def test_unknown_option_names_file_line_and_field(registry: Registry) -> None:
    text = MINIMAL.replace("    count: 10", "    count: 10\n    visits_per_minit: 5")
    assert problems(registry, text) == ["p.yaml:4: sources[0].visits_per_minit: unknown option"]


def test_wrong_type_names_the_field(registry: Registry) -> None:
    text = MINIMAL.replace("count: 10", "count: lots")
    (problem,) = problems(registry, text)
    assert problem == "p.yaml:3: sources[0].count: expected int, got str"


def test_every_problem_is_reported_at_once(registry: Registry) -> None:
    text = MINIMAL.replace("count: 10", "count: -1").replace("path: out.duckdb", "paht: x")
    assert [p.split(":")[1] for p in problems(registry, text)] == ["3", "6"]


def test_missing_variable_is_an_error_with_its_line(registry: Registry) -> None:
    text = MINIMAL.replace("path: out.duckdb", "path: ${OUT_DIR}/x.duckdb")
    (problem,) = problems(registry, text)
    assert problem.startswith("p.yaml:6: sinks[0].path: environment variable OUT_DIR is not set")


def test_variables_and_defaults_are_interpolated_and_typed(pipeline: Callable[..., Pipeline]) -> None:
    text = MINIMAL.replace("count: 10", "count: ${COUNT}").replace("out.duckdb", "${DIR:-/tmp}/$${literal}.db")
    text += "monitor:\n  port: ${PORT:-9000}\n"
    loaded = pipeline(text, {"COUNT": "25"})
    assert loaded.sources[0].options.count == 25  # type: ignore[attr-defined]
    assert loaded.sinks[0].options.path == "/tmp/${literal}.db"  # type: ignore[attr-defined]
    assert loaded.monitor is not None and loaded.monitor.port == 9000


def test_durations_accept_human_units(pipeline: Callable[..., Pipeline]) -> None:
    text = MINIMAL + "    batch:\n      max_age: 250ms\n" + "runtime:\n  shutdown_timeout: 2m\n"
    loaded = pipeline(text)
    assert loaded.sinks[0].options.batch.max_age == timedelta(milliseconds=250)  # type: ignore[attr-defined]
    assert loaded.runtime.shutdown_timeout == timedelta(minutes=2)


def test_a_partial_batch_or_retry_keeps_the_sinks_other_defaults(pipeline: Callable[..., Pipeline]) -> None:
    options = pipeline(MINIMAL + "    batch: {max_rows: 1000}\n    retry: {attempts: 2}\n").sinks[0].options
    defaults = DuckDBSinkOptions()
    assert options.batch == msgspec.structs.replace(defaults.batch, max_rows=1000)  # type: ignore[attr-defined]
    assert options.retry == msgspec.structs.replace(defaults.retry, attempts=2)  # type: ignore[attr-defined]
    assert defaults.batch.max_bytes != BatchLimits().max_bytes  # the sink's own limits, not the generic ones


def test_an_empty_runtime_or_monitor_section_means_the_defaults(pipeline: Callable[..., Pipeline]) -> None:
    loaded = pipeline(MINIMAL + "runtime:\nmonitor:\n")
    assert loaded.runtime.shutdown_timeout == timedelta(seconds=30) and loaded.monitor is None


def test_an_event_loop_that_is_not_installed_is_refused_with_how_to_get_it(
    registry: Registry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("clickflow.config.uvloop_installed", lambda: False)
    assert problems(registry, MINIMAL + "runtime:\n  event_loop: uvloop\n") == [
        "p.yaml:7: runtime: event_loop: uvloop is not installed (pip install uvloop; it has no Windows build)"
    ]
    assert problems(registry, MINIMAL + "runtime: {event_loop: trio}\n")[0].startswith("p.yaml:7: runtime.event_loop")


def test_unknown_section_is_rejected(registry: Registry) -> None:
    assert problems(registry, MINIMAL + "sinkz: []\n") == ["p.yaml:7: sinkz: unknown section"]


def test_sources_and_sinks_are_required(registry: Registry) -> None:
    assert problems(registry, "sources: []\n") == [
        "p.yaml:1: sources: needs at least one source",
        "p.yaml:1: sinks: required: a list of at least one sink",
    ]


def test_invalid_yaml_reports_its_line(registry: Registry) -> None:
    (problem,) = problems(registry, "sources:\n  - type: [unclosed\n")
    assert problem.startswith("p.yaml:3: invalid YAML")


@pytest.mark.parametrize(
    ("source", "jobs", "refused"),
    [
        ("{type: pubsub_push, auth: none, ack_timeout: 90s}", 1000, False),  # 86.4 s apart
        ("{type: pubsub_push, auth: none, ack_timeout: 90s}", 900, True),  # 96 s apart
        ("{type: pubsub_pull, subscription: projects/p/subscriptions/s}", 1, False),  # leases, waits for nobody
        ("{type: file, path: in.json}", 1, False),
    ],
)
def test_a_sink_spacing_its_writes_longer_than_a_sender_waits_is_refused(
    registry: Registry, source: str, jobs: int, refused: bool
) -> None:
    text = (
        f"sources: [{source}]\nmonitor: {{port: 0}}\n"
        f"sinks: [{{type: bigquery_load, name: bq, project: p, dataset: d, jobs_per_table_per_day: {jobs}}}]\n"
    )
    if refused:
        assert problems(registry, text) == [
            "p.yaml:3: sinks[0]: sink 'bq' keeps 96s between writes under steady load, no less than source "
            "'pubsub_push' waits for its messages to be stored (90s): they would be answered as not stored, sent "
            "again and stored again; use a sink that stores sooner, or let the source wait longer"
        ]
    else:
        assert parse_pipeline(text, registry, "p.yaml", {}).sinks[0].name == "bq"


@pytest.mark.parametrize(
    ("sources", "warned"),
    [
        (["{type: pubsub_pull, subscription: projects/p/subscriptions/a}"], []),
        (["{type: pubsub_pull, subscription: projects/p/subscriptions/a}", "{type: file, path: in.jsonl}",
          "{type: simulator}", "{type: file, path: more.jsonl}"], []),  # ids of their own: paths, content
        (["{type: pubsub_pull, subscription: projects/p/subscriptions/a}", "{type: file, path: in.jsonl}",
          "{type: pubsub_pull, subscription: projects/p/subscriptions/b}", "{type: pubsub_push, auth: none}"], [2, 3]),
    ],
)  # fmt: skip
def test_two_pubsub_sources_in_one_pipeline_are_warned_as_their_ids_may_meet(
    registry: Registry, sources: list[str], warned: list[int]
) -> None:
    text = "sinks: [{type: duckdb, path: x.db, commit_every: 1s}]\nmonitor: {port: 0}\nsources:\n"
    text += "".join(f"  - {source}\n" for source in sources)
    warnings = [str(w) for w in parse_pipeline(text, registry, "p.yaml", {}).warnings]
    assert warnings == [
        f"p.yaml:{4 + index}: sources[{index}]: warning: its message ids, like those of sources[0], are unique "
        "within a Pub/Sub topic only, and the sinks key rows on them: a message from another one with the same "
        "id would be taken for a redelivery and not stored; give each its own pipeline and sinks"
        for index in warned
    ]


@pytest.mark.parametrize(
    ("source", "sink", "warned"),
    [
        ("{type: pubsub_push, auth: none}", "{type: duckdb, path: x.db}", True),
        ("{type: pubsub_push, auth: none}", "{type: duckdb, path: x.db, commit_every: 1s}", False),
        ("{type: file, path: in.json}", "{type: duckdb, path: x.db}", False),  # its batches are large
        ("{type: pubsub_push, auth: none}", "{type: bigquery_streaming, project: p, dataset: d}", False),
    ],
)
def test_a_sink_that_would_slow_a_source_whose_senders_wait_is_warned_not_refused(
    registry: Registry, source: str, sink: str, warned: bool
) -> None:
    text = f"sources: [{source}]\nmonitor: {{port: 0}}\nsinks: [{sink}]\n"
    loaded = parse_pipeline(text, registry, "p.yaml", {})
    warnings = [str(w) for w in loaded.warnings]
    if warned:
        assert warnings == [
            "p.yaml:3: sinks[0]: warning: source 'pubsub_push' answers its senders only once their messages are "
            "stored, and without commit_every each write is a DuckDB transaction (milliseconds, whatever its size), "
            "which holds it to about a fifth of the rate it reaches with commit_every: 1s (each batch acknowledged "
            "once logged, the log inserted every second)"
        ]
    else:
        assert warnings == []
    assert [c.name for c in loaded.sinks] == [sink.split(",")[0].removeprefix("{type: ").rstrip("}")]


@pytest.mark.parametrize(
    ("source", "runtime", "refused"),
    [
        ("{type: pubsub_pull, subscription: projects/p/subscriptions/s}", "", False),  # 20 s against 60 s
        ("{type: pubsub_pull, subscription: projects/p/subscriptions/s, pull_timeout: 50s}", "", False),
        ("{type: pubsub_pull, subscription: projects/p/subscriptions/s, pull_timeout: 60s}", "", True),
        ("{type: pubsub_pull, subscription: projects/p/subscriptions/s, pull_timeout: 60s}", "61s", False),
        ("{type: pubsub_push, auth: none}", "5s", True),  # it reports every 5 s while no request comes
        ("{type: pubsub_push, auth: none}", "6s", False),
        ("{type: simulator, visits_per_minute: 2}", "30s", True),
        ("{type: simulator}", "1s", False),  # unthrottled: never waits
        ("{type: file, path: in.json}", "1s", False),
    ],
)
def test_a_source_that_reports_less_often_than_healthz_expects_is_refused(
    registry: Registry, source: str, runtime: str, refused: bool
) -> None:
    text = f"sources: [{source}]\nsinks: [{{type: duckdb, path: x.db}}]\nmonitor: {{port: 0}}\n"
    text += f"runtime: {{heartbeat_max_age: {runtime}}}\n" if runtime else ""
    if refused:
        (problem,) = problems(registry, text)
        assert problem.startswith("p.yaml:1: sources[0]: source ") and "/healthz would fail" in problem
    else:
        assert len(parse_pipeline(text, registry, "p.yaml", {}).sources) == 1


def test_duplicate_types_get_distinct_names(pipeline: Callable[..., Pipeline]) -> None:
    text = MINIMAL.replace("sinks:", "  - type: simulator\n    count: 1\nsinks:")
    assert [s.name for s in pipeline(text).sources] == ["simulator", "simulator-2"]


def test_explicit_names_must_be_unique(registry: Registry) -> None:
    text = MINIMAL.replace("sinks:", "  - type: simulator\n    name: simulator\nsinks:")
    text = text.replace("  - type: simulator\n    count: 10", "  - type: simulator\n    name: simulator")
    assert problems(registry, text) == ["p.yaml:5: sources[1].name: name 'simulator' is used twice"]


def test_unreadable_file_is_a_config_error(registry: Registry, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read pipeline"):
        load_pipeline(tmp_path / "missing.yaml", registry)


EXAMPLE_ENVIRONMENT = {
    "PROJECT_ID": "demo-project",
    "PUSH_AUDIENCE": "https://clickflow.example.com/pubsub/push",
    "PUSH_SERVICE_ACCOUNT": "pusher@demo-project.iam.gserviceaccount.com",
}


@pytest.mark.parametrize("path", sorted((REPO / "config").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_pipeline_is_valid(registry: Registry, path: Path) -> None:
    loaded = load_pipeline(path, registry, environ=EXAMPLE_ENVIRONMENT)
    assert loaded.sources and loaded.sinks


@pytest.mark.parametrize(
    ("text", "seconds"), [("250ms", 0.25), ("30s", 30), ("5m", 300), ("1h", 3600), ("1.5", 1.5), ("0", 0), (2, 2)]
)
def test_duration_spellings(pipeline: Callable[..., Pipeline], text: object, seconds: float) -> None:
    loaded = pipeline(MINIMAL + f"runtime:\n  shutdown_timeout: '{text}'\n" if isinstance(text, str)
                      else MINIMAL + f"runtime:\n  shutdown_timeout: {text}\n")  # fmt: skip
    assert loaded.runtime.shutdown_timeout == timedelta(seconds=seconds)


@pytest.mark.parametrize("text", ["soon", "-5s", "5 minutes"])
def test_bad_durations_are_rejected(registry: Registry, text: str) -> None:
    (problem,) = problems(registry, MINIMAL + f"runtime:\n  shutdown_timeout: '{text}'\n")
    assert problem.startswith("p.yaml:8: runtime.shutdown_timeout:")
