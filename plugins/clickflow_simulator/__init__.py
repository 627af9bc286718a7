"""The ``simulator`` source and the ``clickflow simulate`` command: synthetic traffic."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import anyio
import click
import msgspec
from msgspec import Meta

from clickflow.api import AnySource, Message, NoAck, Source, SourceContext, content_id
from clickflow.hookspecs import Register, hookimpl
from clickflow.options import Duration, OptionsError, PositiveInt, SourceOptions, validate_options
from clickflow_simulator.generator import Spike, VisitGenerator, run_start

__all__ = ["SimulatorSource", "VisitGenerator", "simulated_messages"]

TICK_S = 0.05
"""Throttled, a batch holds the visits due when it is cut (all of them, for a reader that fell
behind) and those due within this long after: a visit a batch cost the runtime a batch's fixed
cost (about 0.2 ms) for every visit, 333 times a second in the quickstart."""


class SimulatorOptions(SourceOptions, kw_only=True):
    visits_per_minute: Annotated[float, Meta(gt=0)] | None = None
    """Throttle to this rate; unset means as fast as the pipeline takes them."""
    duration: Duration | None = None
    count: PositiveInt | None = None
    seed: int | None = None
    start: datetime | None = None
    """Virtual time of the first visit; defaults to now."""
    event_format: Literal["wrapped", "bare"] = "wrapped"
    malformed_rate: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0
    """Share of messages deliberately broken, to exercise dead letters."""
    batch_size: PositiveInt = 1000
    spike_at: Duration | None = None
    """Simulate an attack this long (virtual time) after the start: a burst of page views."""
    spike_factor: Annotated[float, Meta(gt=1.0, le=1000.0)] = 20.0
    """How many times the usual rate of visits the burst brings."""
    spike_duration: Duration = Duration(minutes=2)

    def heartbeat_within(self) -> timedelta | None:
        """Throttled, it reports before each wait for the next visit."""
        return timedelta(minutes=1) / self.visits_per_minute if self.visits_per_minute else None

    def spike(self) -> Spike | None:
        if self.spike_at is None:
            return None
        return Spike(self.spike_at.total_seconds(), self.spike_factor, self.spike_duration.total_seconds())


def simulated_messages(
    options: SimulatorOptions, clock: Callable[[], float] = time.monotonic
) -> Iterator[tuple[float, list[bytes]]]:
    """Batches of messages with the clock time each batch is due (0 when unthrottled).

    Stops after ``count`` messages or ``duration`` of run time, whichever comes first.
    """
    generator = VisitGenerator(
        seed=options.seed,
        start=options.start,
        visits_per_minute=options.visits_per_minute,
        event_format=options.event_format,
        malformed_rate=options.malformed_rate,
        spike=options.spike(),
    )
    started = clock()
    ends = started + options.duration.total_seconds() if options.duration else float("inf")
    index = 0
    while options.count is None or index < options.count:
        now = clock()
        if now >= ends:
            return
        if options.visits_per_minute:
            first = generator.offset_s(index)
            due = started + first
            if due >= ends:
                return
            until = max(now - started, first) + TICK_S
            size = 1
            while size < options.batch_size:
                later = generator.offset_s(index + size)
                if later >= until or started + later >= ends:
                    break
                size += 1
        else:
            due, size = 0.0, options.batch_size
        if options.count is not None:
            size = min(size, options.count - index)
        yield due, [generator.message(index + i) for i in range(size)]
        index += size


async def paced(
    batches: Iterable[tuple[float, list[bytes]]], waiting: Callable[[], None] = lambda: None
) -> AsyncIterator[list[bytes]]:
    """Each batch of ``simulated_messages`` once it is due, calling ``waiting`` before a wait: the
    one pacing loop of the simulator source, ``clickflow simulate`` and its publisher."""
    for due, batch in batches:
        delay = due - time.monotonic()
        if delay > 0:
            waiting()
            await anyio.sleep(delay)
        yield batch


class SimulatorSource(Source[SimulatorOptions]):
    """Generates visits; finite when ``count`` is set.

    ``duration`` ends it too, but a run stopped before its end is not a partial one."""

    type_name = "simulator"

    @property
    def finite(self) -> bool:
        return self.options.count is not None

    @property
    def eager(self) -> bool:
        """Unthrottled, a finite run's visits are all there, as a file's are, and sinks write them
        whenever free. Throttled, they arrive over time, as a stream's do, and sinks gather them for
        their ``max_age``: written whenever DuckDB was free, the quickstart's 333 visits a second
        kept it committing small batches back to back, a core busy for nothing."""
        return self.finite and not self.options.visits_per_minute

    async def run(self, context: SourceContext) -> None:
        """Message ids are ``simulator:START:INDEX#FINGERPRINT``: a run's visits are timed from its
        start, so a run at another time has other ids, even for messages whose bytes hold no time (a
        visit without events, a malformed one), and a run with another seed or format other content."""
        start = run_start(self.options.start)
        place, options = f"simulator:{int(start.timestamp())}", msgspec.structs.replace(self.options, start=start)
        index = 0
        async for batch in paced(simulated_messages(options), context.heartbeat):
            messages = [Message(data, content_id(f"{place}:{index + i}", data)) for i, data in enumerate(batch)]
            index += len(batch)
            await context.emit(messages, NoAck())
            context.progress(index, self.options.count, unit="visits")


@click.command()
@click.option("--visits-per-minute", type=float, help="Throttle to this rate (default: unthrottled).")
@click.option("--duration", help="Stop after this long, e.g. 30s or 5m.")
@click.option("--count", type=int, help="Stop after this many visits.")
@click.option("--seed", type=int, help="Make the output reproducible.")
@click.option("--format", "event_format", type=click.Choice(["wrapped", "bare"]), default="wrapped")
@click.option("--malformed-rate", type=float, default=0.0, help="Share of deliberately broken messages.")
@click.option("--topic", help="Publish to projects/P/topics/T instead of printing (needs clickflow[gcp]).")
@click.option("--concurrency", type=int, default=8, show_default=True, help="Publish requests in flight.")
@click.option("--spike-at", help="Simulate an attack this long after the start, e.g. 10m.")
@click.option("--spike-factor", type=float, default=20.0, show_default=True, help="The attack's rate over the usual.")
@click.option("--spike-duration", default="2m", show_default=True, help="How long the attack lasts.")
def simulate(topic: str | None, concurrency: int, **given: Any) -> None:
    """Print simulated visits as JSON lines, or publish them to a Pub/Sub topic."""
    try:  # the other options are the source's own, validated as a pipeline file's would be
        options = validate_options(SimulatorOptions, {k: v for k, v in given.items() if v is not None})
    except OptionsError as exc:
        raise click.UsageError(str(exc)) from None
    if topic:
        _publish(topic, options, concurrency)
        return
    try:
        anyio.run(_print, options)
    except BrokenPipeError:
        sys.stderr.close()  # the reader went away (e.g. `| head`); not an error


async def _print(options: SimulatorOptions) -> None:
    out = sys.stdout.buffer
    async for batch in paced(simulated_messages(options), out.flush):
        out.write(b"\n".join(batch) + b"\n")
    out.flush()


def _publish(topic: str, options: SimulatorOptions, concurrency: int) -> None:
    try:
        from clickflow_pubsub.publish import publish
    except ImportError as exc:
        raise click.ClickException("publishing needs: pip install 'clickflow[gcp]'") from exc
    if options.count is None and options.duration is None:
        raise click.UsageError("publishing needs --count or --duration")
    from clickflow.gcp import NoCredentials
    from clickflow_pubsub.publish import PublishError

    try:
        report = anyio.run(publish, topic, paced(simulated_messages(options)), concurrency)
    except (NoCredentials, PublishError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"published {report.messages:,} visits in {report.seconds:.1f}s ({report.per_second:,.0f}/s)", err=True)


@hookimpl
def register_sources(register: Register[AnySource]) -> None:
    register(SimulatorSource)


@hookimpl
def register_commands(cli: click.Group) -> None:
    cli.add_command(simulate)
