"""A pytest plugin for clickflow plugin authors (installed with clickflow, as ``pytest11``).

Fixtures:

- ``clickflow_registry``: every installed source and sink, loaded like ``clickflow run`` does;
- ``clickflow_pipeline``: ``clickflow_pipeline(yaml_text, environ=None)`` -> a validated ``Pipeline``;
- ``clickflow_run``: ``clickflow_run(pipeline)`` -> the ``RunSummary`` of running it to the end, on the
  event loop ``clickflow run`` would use (also importable as ``run_pipeline``).

A plugin's tests can then run a real pipeline through its own source or sink::

    def test_my_sink(clickflow_pipeline, clickflow_run, tmp_path):
        summary = clickflow_run(clickflow_pipeline(
            "sources: [{type: simulator, count: 100, seed: 1}]\\n"
            f"sinks: [{{type: my_sink, directory: '{tmp_path}'}}]"
        ))
        assert summary.rows["visits"] == 100
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import anyio
import pytest

from clickflow.config import Pipeline, parse_pipeline
from clickflow.plugins import Registry, load_plugins
from clickflow.runtime import Runtime, backend_options
from clickflow.summary import RunSummary


@pytest.fixture(scope="session")
def clickflow_registry() -> Registry:
    return load_plugins()


@pytest.fixture
def clickflow_pipeline(clickflow_registry: Registry) -> Callable[..., Pipeline]:
    def build(text: str, environ: Mapping[str, str] | None = None) -> Pipeline:
        return parse_pipeline(text, clickflow_registry, "test.yaml", environ or {})

    return build


def run_pipeline(pipeline: Pipeline) -> RunSummary:
    """Run a pipeline to its end, on the event loop its runtime options name, as ``clickflow run`` does."""
    return anyio.run(Runtime(pipeline).run, backend_options=backend_options(pipeline.runtime))


@pytest.fixture
def clickflow_run() -> Callable[[Pipeline], RunSummary]:
    return run_pipeline
