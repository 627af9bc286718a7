"""``clickflow dlq list`` and ``clickflow dlq replay``: the dead letters of a pipeline's sinks."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import anyio
import click

from clickflow.api import AnySink
from clickflow.config import Pipeline
from clickflow.dlq import DeadLetterQuery, DeadLetterStore, replay
from clickflow.logs import describe
from clickflow.parser import VisitParser
from clickflow.rejections import PARSER_VERSION

_reasons = click.option("--reason", "reasons", multiple=True, help="Only this reason (repeatable).")
_since = click.option(
    "--since", help="Only dead letters received since: a time (2026-12-01T09:00Z) or an age (24h, 7d)."
)


@click.group()
def dlq() -> None:
    """Dead letters: see what was rejected and why, and replay it once the cause is fixed."""


@dlq.command(name="list")
@click.argument("pipeline", type=click.Path(dir_okay=False))
@_reasons
@_since
def list_dead_letters(pipeline: str, reasons: tuple[str, ...], since: str | None) -> None:
    """Count PIPELINE's dead letters not yet replayed, by reason and source, with a sample of each."""
    query = DeadLetterQuery(reasons, _since_us(since))

    async def run(_: Pipeline, stores: Sequence[DeadLetterStore], names: str) -> None:
        groups = await stores[0].dead_letter_groups(query)
        total = sum(g.count for g in groups)
        click.echo(f"{total:,} dead letters not yet replayed in {names}")
        if groups:
            click.echo(f"  {'reason':<20} {'source':<16} {'count':>9}  {'last received':<20}  sample")
        for g in groups:
            sample = f"{g.sample_message_id}: {g.sample_error}".replace("\n", " ")
            click.echo(f"  {g.reason:<20} {g.source:<16} {g.count:>9,}  {_time(g.last_us):<20}  {sample[:100]}")

    _with_stores(pipeline, run)


@dlq.command(name="replay")
@click.argument("pipeline", type=click.Path(dir_okay=False))
@_reasons
@_since
@click.option("--dry-run", is_flag=True, help="Parse them again and report; store and mark nothing.")
@click.option("--metrics-file", type=click.Path(dir_okay=False), help="Write the outcome as Prometheus metrics here.")
def replay_dead_letters(
    pipeline: str, reasons: tuple[str, ...], since: str | None, dry_run: bool, metrics_file: str | None
) -> None:
    """Parse PIPELINE's dead letters again with today's parser; store what now parses in the
    pipeline's sinks (rows stored before are skipped) and mark those dead letters replayed."""
    query = DeadLetterQuery(reasons, _since_us(since))

    async def run(loaded: Pipeline, stores: Sequence[DeadLetterStore], names: str) -> None:
        parser = VisitParser(loaded.runtime.max_message_bytes)
        report = await replay(stores, query, parser, dry_run=dry_run)
        verb = "would replay" if dry_run else "replayed"
        click.echo(f"{verb} from {names} with parser {PARSER_VERSION}:")
        for label, counts in (
            (verb, report.replayed),
            ("still failing", report.still_failing),
            ("not replayable", report.not_replayable),
            ("rows " + ("to store" if dry_run else "made"), report.rows),
        ):
            click.echo(f"  {label:<15} {_counts(counts)}")
        if report.held_back:
            click.echo(f"  held back       {report.held_back:,} received too recently to be marked; replay them later")
        for note in report.notes[:20]:
            click.echo(f"  - {note}", err=True)
        if len(report.notes) > 20:
            click.echo(f"  - and {len(report.notes) - 20:,} more", err=True)
        if metrics_file:
            from prometheus_client import write_to_textfile

            write_to_textfile(metrics_file, report.registry())

    _with_stores(pipeline, run)


def _with_stores(path: str, work: Callable[[Pipeline, Sequence[DeadLetterStore], str], Any]) -> None:
    """Open the pipeline's sinks that keep dead letters, run ``work`` with them, close them."""
    from clickflow.cli import EXIT_FAILED, load_or_exit

    pipeline = load_or_exit(path)
    sinks = (replace(component, options=component.options.existing_only()).build() for component in pipeline.sinks)
    stores = [sink for sink in sinks if isinstance(sink, DeadLetterStore)]
    if not stores:
        raise click.ClickException(f"{path}: no sink keeps dead letters clickflow can read (duckdb, bigquery_*)")
    names = ", ".join(f"{store.type_name} {store.name!r}" for store in stores)
    read = stores[0]  # what both commands read
    why = read.options.nothing_stored()
    if why is not None:  # opening it would make an empty one and find nothing: a mistyped path, say
        raise click.ClickException(f"{path}: {read.type_name} {read.name!r} holds no dead letters: {why}")

    async def run() -> None:
        async with _opened(stores):
            await work(pipeline, stores, names)

    try:
        anyio.run(run)
    except Exception as exc:  # a database locked by a running pipeline, an unreachable API
        click.echo(f"clickflow: {describe(exc)}", err=True)
        sys.exit(EXIT_FAILED)


@asynccontextmanager
async def _opened(sinks: Sequence[AnySink]) -> AsyncIterator[None]:
    async with AsyncExitStack() as stack:
        for sink in sinks:
            stack.push_async_callback(sink.close)  # a sink that failed to open is closed too
            await sink.open()
        yield


def _since_us(text: str | None) -> int | None:
    if text is None:
        return None
    from clickflow.options import parse_duration

    try:
        age = parse_duration(text)
        return int((datetime.now(UTC) - age).timestamp() * 1_000_000)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither a time (2026-12-01T09:00Z) nor an age (24h, 7d)") from None
    return int((moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp() * 1_000_000)


def _time(us: int) -> str:
    return datetime.fromtimestamp(us // 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _counts(counts: Counter[str]) -> str:
    return ", ".join(f"{key} {n:,}" for key, n in sorted(counts.items())) or "none"
