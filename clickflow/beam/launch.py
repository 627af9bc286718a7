"""From a validated pipeline file to a Beam pipeline: check, set the runner's options, build, run.

Everything that can be refused is refused in ``prepare``, before a transform is
built: a source or sink without a Beam translation, one whose translation
refuses these options (DuckDB or local files on Dataflow), an unknown Beam flag, and on
Dataflow a missing project, region or ``gs://`` temp location (checked offline;
Beam validates the rest when it submits the job).

Local runs name their runner explicitly. Beam's ``DirectRunner`` first tries to
download and start its Prism runner, which fails without internet and then
falls back; clickflow picks the runner that would end up doing the work:
``FnApiRunner`` (in-process; ``--direct_num_workers`` and
``--direct_running_mode multi_processing`` use more cores) for batch pipelines,
``BundleBasedDirectRunner``, the local runner that reads unbounded sources, for
streaming ones.

Dataflow's workers get clickflow, its built-in plugins and their dependencies
from ``--setup_file pyproject.toml`` of the checkout clickflow runs from: Beam
builds an sdist with ``python -m build`` and each worker installs it.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import apache_beam as beam
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import GoogleCloudOptions, PipelineOptions, SetupOptions, StandardOptions
from apache_beam.runners.runner import PipelineResult

import clickflow
from clickflow.api import AnySink, AnySource
from clickflow.beam.transforms import (
    DATAFLOW_RUNNER,
    METRICS_NAMESPACE,
    BeamRead,
    BeamWrite,
    Tables,
    on_dataflow,
    parse,
)
from clickflow.config import Pipeline
from clickflow.schema import TABLE_NAMES
from clickflow.summary import RunSummary

BATCH_RUNNER = "FnApiRunner"
STREAMING_RUNNER = "BundleBasedDirectRunner"


class BeamError(Exception):
    """The pipeline cannot run on Beam as configured; ``problems`` says why, one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


@dataclass
class Launch:
    """A pipeline ready to be built and run on Beam."""

    options: PipelineOptions
    reads: dict[str, BeamRead]
    writes: dict[str, BeamWrite]

    @property
    def runner(self) -> str:
        return str(self.options.view_as(StandardOptions).runner)

    def flags(self) -> list[str]:
        """The options as command-line flags, as Beam will see them (defaults left out)."""
        flags = []
        for key, value in sorted(self.options.get_all_options(drop_default=True, retain_unknown_options=True).items()):
            for item in value if isinstance(value, list) else [value]:
                flags.append(f"--{key}" if item is True else f"--{key}={item}")
        return flags

    def build(self) -> beam.Pipeline:
        pipeline = beam.Pipeline(options=self.options)
        parsed = [parse(pipeline | f"Read {name}" >> read, name) for name, read in self.reads.items()]
        tables: Tables = {}
        for table in TABLE_NAMES:
            parts = [p[table] for p in parsed]
            tables[table] = parts[0] if len(parts) == 1 else parts | f"All {table}" >> beam.Flatten()
        for name, write in self.writes.items():
            _ = tables | f"Write {name}" >> write
        return pipeline

    @property
    def detached(self) -> bool:
        """The job runs on Dataflow without this process: a stream, or a job written as a template
        (``--template_location``, as a Flex Template's launcher asks) that Dataflow then starts."""
        template = self.options.view_as(GoogleCloudOptions).template_location
        return on_dataflow(self.options) and bool(self.options.view_as(StandardOptions).streaming or template)

    def run(self) -> RunSummary | None:
        """Run and wait for the summary; None for a detached job, which is submitted and left running."""
        started = time.perf_counter()
        logging.getLogger("apache_beam").setLevel(max(logging.WARNING, logging.getLogger().level))
        result = self.build().run()
        if self.detached:
            return None
        result.wait_until_finish()
        summary = summary_of(result)
        if not on_dataflow(self.options):
            for name, write in self.writes.items():
                if stored_already := write.finish(summary.rows):
                    summary.stored_already[name] = stored_already
        summary.seconds = time.perf_counter() - started
        return summary


def prepare(pipeline: Pipeline, runner: str, flags: Sequence[str]) -> Launch:
    """Translate ``pipeline`` for ``runner`` (``beam`` or ``dataflow``), or raise ``BeamError``."""
    problems: list[str] = []
    reads = {c.name: _translation(c.cls, c.name, c.options, BeamRead, problems) for c in pipeline.sources}
    writes = {c.name: _translation(c.cls, c.name, c.options, BeamWrite, problems) for c in pipeline.sinks}
    streaming = any(isinstance(r, BeamRead) and r.streaming for r in reads.values())
    options = pipeline_options(runner, flags, streaming, problems)
    for kind, translations in (("source", reads), ("sink", writes)):
        for name, translation in translations.items():
            if translation is not None and (reason := translation.refusal(options)):
                problems.append(f"{kind} {name!r}: {reason}")
    if problems:
        raise BeamError(problems)
    return Launch(options, reads, writes)


def _translation(
    cls: type[AnySource] | type[AnySink], name: str, options: Any, base: type[Any], problems: list[str]
) -> Any:
    kind = "source" if base is BeamRead else "sink"
    if cls.beam is None:
        problems.append(f"{kind} {name!r}: type {cls.type_name!r} has no Beam translation; run it with --runner local")
        return None
    module, _, attribute = cls.beam.partition(":")
    translation = getattr(importlib.import_module(module), attribute)
    if not (isinstance(translation, type) and issubclass(translation, base)):
        problems.append(f"{kind} {name!r}: {cls.beam} is not a {base.__name__}")
        return None
    return translation(cls(name, options))


def pipeline_options(runner: str, flags: Sequence[str], streaming: bool, problems: list[str]) -> PipelineOptions:
    """Beam's options from the flags given, with the runner, streaming mode and packaging set."""
    options = PipelineOptions(list(flags))
    known = options.get_all_options()
    given = options.get_all_options(retain_unknown_options=True)
    problems += [f"unknown Beam option --{flag}" for flag in given if flag not in known]
    standard = options.view_as(StandardOptions)
    standard.streaming = bool(standard.streaming) or streaming
    if runner == "dataflow":
        standard.runner = DATAFLOW_RUNNER
        setup = options.view_as(SetupOptions)
        if not (setup.setup_file or setup.extra_packages):
            project = source_checkout()
            if project is None:
                problems.append("clickflow is not installed from a checkout: pass --setup_file or --extra_package")
            else:
                setup.setup_file = str(project)
        problems += _dataflow_problems(options)
    else:
        standard.runner = STREAMING_RUNNER if standard.streaming else BATCH_RUNNER
    return options


def source_checkout() -> Path | None:
    """The ``pyproject.toml`` of the checkout clickflow is installed from (editable), if any."""
    pyproject = Path(clickflow.__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.is_file() and 'name = "clickflow"' in pyproject.read_text():
        return pyproject
    return None


def _dataflow_problems(options: PipelineOptions) -> list[str]:
    """What Dataflow would refuse at submission, checked here without the network."""
    cloud = options.view_as(GoogleCloudOptions)
    problems = [f"Dataflow needs --{flag}" for flag in ("project", "region") if not getattr(cloud, flag)]
    if not (cloud.temp_location or cloud.staging_location or "").startswith("gs://"):
        problems.append("Dataflow needs --temp_location gs://BUCKET/PATH")
    return problems


def summary_of(result: PipelineResult) -> RunSummary:
    """The run's counts, from the counters ``ParseVisits`` keeps."""
    summary = RunSummary()
    counters = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
    tallies: dict[str, Counter[str]] = {
        "messages": summary.messages,
        "rows": summary.rows,
        "dead_letter": summary.dead_letters,
    }
    for counter in counters:
        kind, _, key = counter.key.metric.name.partition(":")
        tallies[kind][key] += counter.committed or 0
    return summary
