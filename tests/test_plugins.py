"""Plugin discovery: built-ins and third-party packages register through the same entry points."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from clickflow.api import AnySink, RowBatch, Sink
from clickflow.config import ConfigError, parse_pipeline
from clickflow.hookspecs import Register, hookimpl
from clickflow.options import SinkOptions
from clickflow.plugins import PluginError, Registry, load_plugins
from clickflow.schema import TABLE_NAMES
from tests.conftest import REPO
from tests.emulators import clickflow


def test_builtins_are_registered_through_entry_points(registry: Registry) -> None:
    sources = {name: r.distribution for name, r in registry.sources.items()}
    assert sources == {
        "file": "clickflow",
        "pubsub_pull": "clickflow",
        "pubsub_push": "clickflow",
        "simulator": "clickflow",
    }
    assert {name: r.distribution for name, r in registry.sinks.items()} == {
        "bigquery_load": "clickflow",
        "bigquery_streaming": "clickflow",
        "bigquery_write": "clickflow",
        "duckdb": "clickflow",
        "live": "clickflow",
    }


def test_a_plugin_registering_something_else_is_an_error() -> None:
    class Broken:
        @hookimpl
        def register_sinks(self, register: Callable[[type[AnySink]], None]) -> None:
            register(dict)  # type: ignore[arg-type]

    with pytest.raises(PluginError, match="broken-dist: <class 'dict'> is not a Sink subclass"):
        load_plugins(extra=[(Broken(), "broken-dist")])


class CountOptions(SinkOptions):
    limit: int = 1


class CountSink(Sink[CountOptions]):
    type_name = "count"

    async def write(self, batch: RowBatch) -> None:
        pass


def test_a_plugins_type_argument_is_its_options_model_and_subclasses_inherit_or_override_it() -> None:
    class MoreOptions(CountOptions):
        more: bool = True

    class Inheriting(CountSink):
        pass

    class Overriding(CountSink):
        Options = MoreOptions

    assert CountSink.Options is CountOptions
    assert Inheriting.Options is CountOptions and Overriding.Options is MoreOptions
    assert CountSink("c", CountOptions()).new_batch().counts() == dict.fromkeys(TABLE_NAMES, 0)


def test_a_plugin_class_without_options_is_refused_with_the_fix() -> None:
    class Bare(Sink):  # type: ignore[type-arg]
        type_name = "bare"

        async def write(self, batch: RowBatch) -> None:
            pass

    class Registers:
        @hookimpl
        def register_sinks(self, register: Callable[[type[AnySink]], None]) -> None:
            register(Bare)

    with pytest.raises(PluginError, match=r"bare-dist: Bare names no options: declare it as Sink\[ItsOptions\]"):
        load_plugins(extra=[(Registers(), "bare-dist")])


class LazyPlugins:
    """Registers sinks by import path: one that exists, one whose module is missing, one misnamed."""

    @hookimpl
    def register_sinks(self, register: Register[AnySink]) -> None:
        register("tests.test_plugins:CountSink", "count")
        register("tests.no_such_module:Sink", "missing")
        register("tests.test_plugins:CountSink", "misnamed")


def test_a_type_registered_by_import_path_loads_when_a_pipeline_uses_it() -> None:
    registry = load_plugins(extra=[(LazyPlugins(), "lazy-dist")])
    assert {"count", "missing", "misnamed"} <= set(registry.sinks)  # nothing imported or checked yet
    assert registry.sink("count") is CountSink

    def problems(sink: str) -> list[str]:
        with pytest.raises(ConfigError) as refused:
            parse_pipeline(f"sources: [{{type: simulator, count: 1}}]\nsinks: [{sink}]\n", registry, "p.yaml", {})
        return [str(problem) for problem in refused.value.problems]

    assert problems("{type: missing}") == [
        "p.yaml:2: sinks[0].type: lazy-dist: cannot load 'missing' from tests.no_such_module:Sink: "
        "No module named 'tests.no_such_module'"
    ]
    assert problems("{type: misnamed}") == [
        "p.yaml:2: sinks[0].type: lazy-dist: CountSink is registered as 'misnamed' but its type_name is 'count'"
    ]
    assert problems("{type: count, limit: x}")[0].startswith("p.yaml:2: sinks[0].limit:")  # its options apply
    parse_pipeline("sources: [{type: simulator, count: 1}]\nsinks: [{type: count}]\n", registry, "p.yaml", {})


def test_a_registration_by_path_needs_module_class_and_a_type_name() -> None:
    class NoName:
        @hookimpl
        def register_sinks(self, register: Register[AnySink]) -> None:
            register("tests.test_plugins:CountSink")

    with pytest.raises(PluginError, match="takes 'module:Class' and its type name"):
        load_plugins(extra=[(NoName(), "noname-dist")])


def test_a_misspelled_hook_is_an_error() -> None:
    class Typo:
        @hookimpl
        def register_sink(self, register: object) -> None:
            pass

    with pytest.raises(Exception, match="unknown hook 'register_sink'"):
        load_plugins(extra=[(Typo(), "typo-dist")])


@pytest.fixture(scope="module")
def example_plugin(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The example third-party plugin, installed for real into a directory of its own."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "clickflow-example-sink"  # the build writes beside its source
    built = shutil.ignore_patterns("build", "*.egg-info")
    shutil.copytree(REPO / "plugins" / "clickflow-example-sink", source, ignore=built)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(source)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(target), os.environ.get("PYTHONPATH", "")])}


def test_installed_plugin_is_listed_with_its_distribution(example_plugin: dict[str, str]) -> None:
    result = clickflow("plugins", env=example_plugin)
    assert result.returncode == 0, result.stderr
    assert any(line.split()[:3] == ["sink", "ndjson", "clickflow-example-sink"] for line in result.stdout.splitlines())


def test_a_pipeline_can_use_the_installed_plugin(example_plugin: dict[str, str], tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"sources: [{{type: simulator, count: 20, seed: 1}}]\nsinks: [{{type: ndjson, directory: '{tmp_path}/out'}}]\n"
    )
    result = clickflow("run", str(pipeline), env=example_plugin)
    assert result.returncode == 0, result.stderr
    visits = (tmp_path / "out" / "visits.ndjson").read_text().splitlines()
    assert len(visits) == 20
    assert json.loads(visits[0])["ingested_at"].endswith("+00:00")


def test_plugin_authors_get_pytest_fixtures(
    clickflow_pipeline: Callable[..., object], clickflow_run: Callable[[object], object], tmp_path: Path
) -> None:
    from clickflow.summary import RunSummary

    summary = clickflow_run(clickflow_pipeline(
        "sources: [{type: simulator, count: 50, seed: 1}]\n"
        f"sinks: [{{type: duckdb, path: '{tmp_path}/fixtures.duckdb'}}]\n"
    ))  # fmt: skip
    assert isinstance(summary, RunSummary)
    assert summary.rows["visits"] == 50


def test_validating_a_pipeline_imports_no_client_library_and_no_plugin_it_does_not_use() -> None:
    """`clickflow validate` stays quick: clients, metrics and the runtime load only when a pipeline runs,
    and a plugin registered by import path only when a pipeline names it."""
    probe = (
        "import sys; from clickflow.cli import main; sys.argv = ['clickflow', 'validate', 'config/local.yaml']\n"
        "try: main()\nexcept SystemExit: pass\n"
        "heavy = {'aiohttp', 'asyncio', 'duckdb', 'clickflow.runtime', 'gcloud', 'prometheus_client',"
        " 'clickflow_file.gcs', 'pydantic', 'uvloop'}\n"
        "unused = ('clickflow_pubsub.', 'clickflow_bigquery.')\n"
        "print(sorted(m for m in sys.modules if m in heavy or m.startswith(unused)))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO)
    assert result.stdout.strip().splitlines() == ["config/local.yaml: ok", "[]"]
