"""The ``clickflow`` command: run, validate, plugins, plus commands plugins add."""

from __future__ import annotations

import logging
import signal
import sys
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio
import click

from clickflow.config import ConfigError, Pipeline, Problem, load_pipeline
from clickflow.dlq_cli import dlq
from clickflow.logs import setup_logging
from clickflow.plugins import PluginError, Registered, Registry, load_plugins

if TYPE_CHECKING:  # the runtime is imported by the commands that run a pipeline, not by `validate`
    from clickflow.runtime import Runtime
from clickflow.summary import RunSummary

log = logging.getLogger(__name__)

EXIT_FAILED = 1
EXIT_INVALID = 2
EXIT_UNFINISHED = 3


def _registry() -> Registry:
    """The plugins loaded once by ``main`` (or now, when the group is invoked some other way)."""
    context = click.get_current_context()
    registry = context.obj
    if not isinstance(registry, Registry):
        try:
            registry = context.obj = load_plugins()
        except PluginError as exc:
            raise click.ClickException(str(exc)) from None
    return registry


def load_or_exit(path: str) -> Pipeline:
    """Load a pipeline file for a command (plugins' commands too): each problem is printed as
    ``FILE:LINE: field: message`` and an invalid file exits 2."""
    try:
        return load_pipeline(path, _registry())
    except ConfigError as exc:
        _echo_problems(exc.problems)
        sys.exit(EXIT_INVALID)


def _echo_problems(problems: list[Problem]) -> None:
    for problem in problems:
        click.echo(str(problem), err=True)


async def _watch_signals(runtime: Runtime, scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if runtime.ready and not scope.cancel_called:
                click.echo(f"\n{signal.Signals(signum).name}: finishing in-flight work (again to abort)", err=True)
                runtime.request_stop()
                async for _ in signals:
                    scope.cancel()
                    return
            scope.cancel()
            return


async def run_pipeline(pipeline: Pipeline, progress: bool) -> RunSummary | None:
    """Run with signal handling, the monitoring server and progress; None if aborted."""
    from clickflow.report import show_progress
    from clickflow.runtime import PipelineError, Runtime, pipeline_error_in

    runtime = Runtime(pipeline)
    summary = None
    try:
        async with AsyncExitStack() as stack:
            if pipeline.monitor:
                from clickflow.monitor import serve  # aiohttp's server: 0.2 s of startup, paid only here

                await stack.enter_async_context(serve(runtime, pipeline.monitor))
            async with anyio.create_task_group() as tg:
                tg.start_soon(_watch_signals, runtime, tg.cancel_scope)
                if progress:
                    tg.start_soon(show_progress, runtime)
                summary = await runtime.run()
                tg.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        raise pipeline_error_in(group) from None
    except OSError as exc:  # e.g. the monitoring port is taken
        raise PipelineError(str(exc)) from exc
    return summary


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="clickflow")
def cli() -> None:
    """Ingest website clickstream data into analytic tables."""


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("pipeline", type=click.Path(dir_okay=False))
@click.argument("beam_flags", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--runner",
    type=click.Choice(["local", "beam", "dataflow"]),
    default="local",
    show_default=True,
    help="local: clickflow's async runtime; beam: Apache Beam on this machine; dataflow: Google Cloud Dataflow.",
)
@click.option("--dry-run", is_flag=True, help="With a Beam runner: check and print what would run, run nothing.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--log-level", default="INFO", show_default=True)
@click.option("--progress/--no-progress", default=None, help="Live status line (default: on a terminal).")
def run(
    pipeline: str,
    beam_flags: tuple[str, ...],
    runner: str,
    dry_run: bool,
    log_format: str,
    log_level: str,
    progress: bool | None,
) -> None:
    """Run PIPELINE until its sources are exhausted or a signal stops it.

    With --runner beam or dataflow, BEAM_FLAGS are passed to Beam, e.g.
    --project P --region R --temp_location gs://B/tmp for Dataflow.
    """
    setup_logging(log_format, log_level)  # type: ignore[arg-type]
    loaded = load_or_exit(pipeline)
    for warning in loaded.warnings:  # logged, so that --log-format json gives them a severity
        log.warning("%s", warning.text(labelled=False))
    if runner != "local":
        summary = _run_on_beam(loaded, runner, beam_flags, dry_run)
    elif beam_flags or dry_run:
        unexpected = " ".join(beam_flags) or "--dry-run"
        raise click.UsageError(f"{unexpected}: Beam options need --runner beam or --runner dataflow")
    else:
        summary = _run_locally(loaded, sys.stderr.isatty() if progress is None else progress)
    if summary is not None:
        from clickflow.report import format_summary

        click.echo(format_summary(summary))
        if summary.unfinished:
            read = ", ".join(f"{name}: {summary.messages[name]:,} messages" for name in summary.unfinished)
            click.echo(f"clickflow: stopped before the end of the input ({read} read)", err=True)
            sys.exit(EXIT_UNFINISHED)


def _run_locally(pipeline: Pipeline, progress: bool) -> RunSummary:
    from clickflow.runtime import PipelineError, backend_options

    try:
        summary = anyio.run(run_pipeline, pipeline, progress, backend_options=backend_options(pipeline.runtime))
    except PipelineError as exc:
        click.echo(f"clickflow: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    if summary is None:
        click.echo("clickflow: aborted; unacknowledged messages will be redelivered", err=True)
        sys.exit(EXIT_FAILED)
    return summary


def _run_on_beam(pipeline: Pipeline, runner: str, flags: tuple[str, ...], dry_run: bool) -> RunSummary | None:
    try:
        from clickflow.beam.launch import BeamError, prepare
    except ImportError as exc:
        message = f"--runner {runner} needs the beam extra: pip install 'clickflow[beam]' ({exc})"
        raise click.ClickException(message) from None
    try:
        launch = prepare(pipeline, runner, flags)
    except BeamError as exc:
        for problem in exc.problems:
            click.echo(f"{pipeline.path}: {problem}", err=True)
        sys.exit(EXIT_INVALID)
    if dry_run:
        for name, read in launch.reads.items():
            click.echo(f"source {name}: {type(read).__name__}")
        for name, write in launch.writes.items():
            click.echo(f"sink {name}: {type(write).__name__}")
        click.echo(f"runner {launch.runner}: " + " ".join(launch.flags()))
        return None
    try:
        summary = launch.run()
    except Exception as exc:  # a worker's error (a broken file, a refused write), which Beam has logged
        click.echo(f"clickflow: the pipeline failed on Beam ({launch.runner}): {exc}", err=True)
        sys.exit(EXIT_FAILED)
    if summary is None:
        click.echo(f"clickflow: submitted to {launch.runner}; the job runs on without this process")
    return summary


@cli.command()
@click.argument("pipelines", nargs=-1, required=True, type=click.Path(dir_okay=False))
def validate(pipelines: tuple[str, ...]) -> None:
    """Check pipeline files without running them; exit 2 if any is invalid."""
    registry = _registry()
    failed = False
    for path in pipelines:
        try:
            pipeline = load_pipeline(path, registry)
        except ConfigError as exc:
            failed = True
            _echo_problems(exc.problems)
        else:
            _echo_problems(pipeline.warnings)
            click.echo(f"{path}: ok")
    if failed:
        sys.exit(EXIT_INVALID)


@cli.command(name="plugins")
def list_plugins() -> None:
    """List every source and sink type, with the distribution that provides it and where it runs."""
    registry = _registry()
    tables: list[tuple[str, dict[str, Registered[Any]]]] = [("source", registry.sources), ("sink", registry.sinks)]
    for kind, table in tables:
        for name, registered in sorted(table.items()):
            try:
                cls = registered.cls
            except PluginError as exc:
                click.echo(f"{kind:<7} {name:<20} {registered.distribution:<28} {'?':<11} {exc}")
                continue
            summary = (cls.__doc__ or "").strip().partition("\n")[0].replace("``", "")  # its first line, as text
            runners = "local,beam" if cls.beam else "local"
            line = f"{kind:<7} {name:<20} {registered.distribution:<28} {runners:<11} {summary}"
            click.echo(line.rstrip())


cli.add_command(dlq)


def main() -> None:
    try:
        registry = load_plugins()
    except PluginError as exc:
        click.echo(f"clickflow: {exc}", err=True)
        sys.exit(EXIT_FAILED)
    registry.manager.hook.register_commands(cli=cli)
    cli(prog_name="clickflow", obj=registry)
