"""BigQuery sinks: ``bigquery_streaming`` (insertAll), ``bigquery_load`` (load jobs) and
``bigquery_write`` (the Storage Write API).

Also the ``clickflow bigquery create-tables PIPELINE`` command, which creates
the dataset and the four tables of every BigQuery sink in a pipeline file.
Needs the ``gcp`` extra; ``BIGQUERY_EMULATOR_HOST`` points everything at an emulator.
"""

from __future__ import annotations

import click

from clickflow.api import AnySink
from clickflow.hookspecs import Register, hookimpl
from clickflow.logs import describe


@hookimpl
def register_sinks(register: Register[AnySink]) -> None:
    # by import path: a sink's module loads only for a pipeline that uses it
    register("clickflow_bigquery.streaming:BigQueryStreamingSink", "bigquery_streaming")
    register("clickflow_bigquery.load:BigQueryLoadSink", "bigquery_load")
    register("clickflow_bigquery.write:BigQueryWriteSink", "bigquery_write")


@click.group()
def bigquery() -> None:
    """BigQuery tables for clickflow's sinks."""


@bigquery.command("create-tables")
@click.argument("pipeline", type=click.Path(exists=True, dir_okay=False))
def create_tables(pipeline: str) -> None:
    """Create the dataset and tables of each BigQuery sink in PIPELINE; check those that exist."""
    import anyio

    from clickflow.cli import load_or_exit
    from clickflow_bigquery.common import BigQueryOptions, BigQuerySink

    sinks = [(c.name, c.cls, c.options) for c in load_or_exit(pipeline).sinks if issubclass(c.cls, BigQuerySink)]
    if not sinks:
        raise click.ClickException(f"{pipeline} has no BigQuery sink")

    async def create() -> None:
        for name, cls, options in sinks:
            assert isinstance(options, BigQueryOptions)
            import msgspec

            sink = cls(name, msgspec.structs.replace(options, create_tables=True))
            try:
                await sink.open()
            finally:
                await sink.close()
            click.echo(f"{name}: {options.project}.{options.dataset} is ready")

    try:
        anyio.run(create)
    except Exception as exc:  # tables that differ, no credentials, an unreachable or refusing API
        raise click.ClickException(describe(exc)) from None


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(bigquery)
