"""Runs a pipeline: sources -> parser -> sinks, linked by small bounded channels.

Each source emits batches of messages into one channel; the parser turns every
batch into rows and hands the same rows to each sink's channel; each sink's
worker gathers batches and writes them. Full channels make the upstream stage
wait, so a slow sink slows the sources instead of filling memory.

A finite run ends when every source has returned and everything is written. A
stop request (SIGINT/SIGTERM) cancels the sources, then lets the in-flight
batches drain for at most ``runtime.shutdown_timeout``.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from clickflow.api import Acknowledger, AnySink, AnySource, Message, RowBatch, parts_of
from clickflow.config import Pipeline, RuntimeOptions, uvloop_installed
from clickflow.delivery import Delivery, Parsed, SinkFailed, SinkWorker
from clickflow.logs import Throttle, describe
from clickflow.metrics import Metrics
from clickflow.parser import VisitParser
from clickflow.quarantine import Quarantine
from clickflow.schema import DeadLetterCol
from clickflow.summary import Progress, RunSummary

log = logging.getLogger(__name__)

RawBatch = tuple[list[Message], Delivery, int]


def backend_options(options: RuntimeOptions) -> dict[str, Any]:
    """``anyio.run``'s options for the event loop ``runtime.event_loop`` names."""
    if options.event_loop != "asyncio" and uvloop_installed():
        import uvloop

        return {"loop_factory": uvloop.new_event_loop}
    return {}


def tune_interpreter() -> None:
    """Make the cyclic garbage collector run less often, and hand the GIL over sooner.

    The parser allocates millions of short-lived tuples, none in reference
    cycles; with Python's default threshold (700 allocations) the collector
    ran constantly and cost about a sixth of the main thread. Objects that
    exist at startup are frozen out of collections altogether.

    Sinks write in worker threads, and DuckDB's client takes the GIL between
    the steps of a query (to check for Ctrl-C). While the parser held it, each
    step waited up to Python's switch interval (5 ms): a DuckDB insert next to
    a busy parser took a third longer than alone. At 1 ms most of that is gone.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    sys.setswitchinterval(0.001)


class PipelineError(Exception):
    """The run could not finish: a source or sink failed in a way retries did not fix."""


class SourceFailed(PipelineError):
    def __init__(self, source: str, cause: BaseException) -> None:
        while isinstance(cause, BaseExceptionGroup) and cause.exceptions:  # the source's own task group
            cause = cause.exceptions[0]
        super().__init__(f"source {source!r} failed: {describe(cause)}")
        self.cause = cause


class _Context:
    """The ``SourceContext`` one source runs with."""

    def __init__(self, runtime: Runtime, source: AnySource) -> None:
        self._runtime = runtime
        self._name = source.name
        self._eager = source.eager
        self._send: MemoryObjectSendStream[RawBatch] | None = None
        metrics = runtime.metrics
        self._received = metrics.messages_received.labels(source.name)
        self._heartbeat = metrics.heartbeat.labels(source.name)
        self.events_parsed = metrics.events_parsed.labels(source.name)
        self.repeated = metrics.repeated.labels(source.name)
        self.acknowledged = {
            ok: metrics.acknowledged.labels(source.name, "ack" if ok else "nack") for ok in (True, False)
        }
        """The source's own metrics, labelled once: ``labels()`` takes microseconds, several times a batch."""
        self.registry = runtime.metrics.registry
        self._unparsed = 0
        self._all_parsed: anyio.Event | None = None

    async def emit(self, messages: list[Message], ack: Acknowledger) -> None:
        runtime = self._runtime
        if self._send is None:
            ack.nack(PipelineError("the pipeline is not running"))
            raise PipelineError(f"source {self._name!r} emitted while the pipeline is not running")
        ids = [m.message_id for m in messages] if ack.redelivers else None
        delivery = Delivery(self._name, ack, len(messages), len(runtime.sinks), runtime._settled, ids, self._eager)
        try:
            await self._send.send((messages, delivery, time.time_ns() // 1000))
        except BaseException as exc:
            ack.nack(exc)  # it never entered the pipeline: hand it back to the source
            raise
        # no await since the send: nothing downstream has seen the batch yet
        runtime._in_flight.add(delivery)
        self._unparsed += 1
        runtime.metrics.in_flight.inc(len(messages))
        runtime.summary.messages[self._name] += len(messages)
        self._received.inc(len(messages))
        self.heartbeat()

    async def until_parsed(self) -> None:
        while self._unparsed:
            self._all_parsed = anyio.Event()
            await self._all_parsed.wait()

    def parsed(self) -> None:
        """The parser handed one of this source's batches to the sinks."""
        self._unparsed -= 1
        if not self._unparsed and self._all_parsed is not None:
            self._all_parsed.set()

    def heartbeat(self, loop: str = "") -> None:
        now = time.time()
        self._runtime.heartbeats[f"{self._name}/{loop}" if loop else self._name] = now
        self._heartbeat.set(now)

    def progress(self, done: int, total: int | None = None, *, unit: str = "messages", bytes_read: int = 0) -> None:
        self._runtime.progress[self._name] = Progress(done, total, unit, bytes_read)


class _SinkContext:
    """The ``SinkContext`` one sink runs with. The visits it says it found stored already go to the
    summary and the metric, and to the log at most every 10 s, and once more at the end (``said``)."""

    def __init__(self, runtime: Runtime, sink: AnySink) -> None:
        self.registry = runtime.metrics.registry
        self._summary = runtime.summary.stored_already
        self._name = sink.name
        self._stored_already = runtime.metrics.stored_already.labels(sink.name)
        self._lines = Throttle()

    def stored_already(self, visits: int) -> None:
        if visits <= 0:
            return
        self._summary[self._name] += visits
        self._stored_already.inc(visits)
        if (since_last := self._lines.count("visits", visits)) is not None:
            self._say(since_last)

    def said(self) -> None:
        """The visits left out of the log since its last line, once the sink has written its last."""
        if unsaid := self._lines.unsaid("visits"):
            self._say(unsaid)

    def _say(self, visits: int) -> None:
        log.info("sink %s: %s visits were stored already, and not stored again (an input read again, "
                 "or a redelivery)", self._name, f"{visits:,}")  # fmt: skip


class Runtime:
    """One pipeline in this process. ``run()`` once; ``request_stop()`` from a signal handler."""

    def __init__(self, pipeline: Pipeline, metrics: Metrics | None = None) -> None:
        self.pipeline = pipeline
        self.metrics = metrics or Metrics()
        self.sources = [component.build() for component in pipeline.sources]
        self.sinks = [component.build() for component in pipeline.sinks]
        self._contexts = {source.name: _Context(self, source) for source in self.sources}
        self.summary = RunSummary()
        self.heartbeats: dict[str, float] = {}
        self.progress: dict[str, Progress] = {}
        self.ready = False
        self._parser = VisitParser(pipeline.runtime.max_message_bytes)
        self._quarantine = Quarantine()
        self._in_flight: set[Delivery] = set()
        self._source_scope: anyio.CancelScope | None = None
        self._stop_requested = False
        self._stop: anyio.Event | None = None

    def healthy(self, now: float | None = None) -> bool:
        """Every running source has reported within ``heartbeat_max_age``."""
        limit = (now or time.time()) - self.pipeline.runtime.heartbeat_max_age.total_seconds()
        return all(beat >= limit for beat in self.heartbeats.values())

    def request_stop(self) -> None:
        """Stop taking input, drain what is in flight, then return from ``run()``."""
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    async def run(self) -> RunSummary:
        tune_interpreter()
        self._stop = anyio.Event()
        self._source_scope = anyio.CancelScope()
        if self._stop_requested:
            self._stop.set()
        started = time.perf_counter()
        async with AsyncExitStack() as stack:
            for sink in self.sinks:
                stack.push_async_callback(self._close, sink)  # a sink that failed to open is closed too
                try:
                    await sink.open()
                except Exception as exc:
                    raise PipelineError(f"sink {sink.name!r} could not start: {describe(exc)}") from exc
                context = _SinkContext(self, sink)
                stack.callback(context.said)  # after the lifespan, whose end may write (a last commit)
                await stack.enter_async_context(_lifespan(f"sink {sink.name!r}", sink.lifespan(context)))
            for source in self.sources:
                lifespan = source.lifespan(self._contexts[source.name])
                await stack.enter_async_context(_lifespan(f"source {source.name!r}", lifespan))
            self.ready = True
            try:
                async with anyio.create_task_group() as outer:
                    outer.start_soon(self._enforce_shutdown_deadline, outer.cancel_scope)
                    await self._flow()
                    outer.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                raise pipeline_error_in(group) from None
            finally:
                self.ready = False
                for delivery in list(self._in_flight):
                    delivery.fail(PipelineError("the run stopped before this batch was written"))
        self.summary.seconds = time.perf_counter() - started
        return self.summary

    async def _close(self, sink: AnySink) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(30):
            try:
                await sink.close()
            except Exception:
                log.exception("sink %s: close failed", sink.name)

    async def _enforce_shutdown_deadline(self, scope: anyio.CancelScope) -> None:
        assert self._stop is not None and self._source_scope is not None
        await self._stop.wait()
        self._source_scope.cancel()
        timeout = self.pipeline.runtime.shutdown_timeout.total_seconds()
        await anyio.sleep(timeout)
        log.error(
            "shutdown deadline of %.0fs passed with %d messages in flight; they are not acknowledged",
            timeout,
            sum(d.messages for d in self._in_flight),
        )
        scope.cancel()

    async def _flow(self) -> None:
        capacity = self.pipeline.runtime.channel_capacity
        raw_send, raw_receive = anyio.create_memory_object_stream[RawBatch](capacity)
        sink_sends = []
        async with anyio.create_task_group() as tg:
            for sink in self.sinks:
                send, receive = anyio.create_memory_object_stream[Parsed](capacity)
                sink_sends.append(send)
                worker = SinkWorker(sink, sink.options.batch, sink.options.retry, self.metrics, self._quarantine)
                tg.start_soon(worker.run, receive)
            tg.start_soon(self._parse, raw_receive, sink_sends)
            tg.start_soon(self._run_sources, raw_send)

    async def _run_sources(self, send: MemoryObjectSendStream[RawBatch]) -> None:
        assert self._source_scope is not None
        async with send:
            with self._source_scope:
                async with anyio.create_task_group() as tg:
                    for source in self.sources:
                        tg.start_soon(self._run_source, source, send.clone())

    async def _run_source(self, source: AnySource, send: MemoryObjectSendStream[RawBatch]) -> None:
        context = self._contexts[source.name]
        async with send:
            context._send = send
            context.heartbeat()
            finished = False
            try:
                await source.run(context)
                finished = True
            except Exception as exc:
                raise SourceFailed(source.name, exc) from exc
            finally:
                if source.finite and not finished:
                    self.summary.unfinished.append(source.name)
                context._send = None
                for key in [k for k in self.heartbeats if k == source.name or k.startswith(f"{source.name}/")]:
                    del self.heartbeats[key]

    async def _parse(
        self, receive: MemoryObjectReceiveStream[RawBatch], sends: list[MemoryObjectSendStream[Parsed]]
    ) -> None:
        summary, metrics = self.summary, self.metrics
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(receive)
            for send in sends:
                await stack.enter_async_context(send)
            async for batch, delivery, received_us in receive:
                context = self._contexts[delivery.source]
                messages = self._once_each(batch, context)
                parts = self._isolate_suspects(messages) if self._quarantine else [(messages, None)]
                pieces = [(piece, size, isolated) for part, isolated in parts for piece, size in parts_of(part)]
                if len(pieces) > 1:
                    delivery.split(len(pieces))
                for part, size, isolated in pieces:
                    rows = self._parse_part(part, isolated, delivery.source, received_us)
                    for table, table_rows in rows.tables.items():
                        summary.rows[table] += len(table_rows)
                    context.events_parsed.inc(len(rows.tables["events"]))
                    if dead_letters := rows.tables["dead_letter"]:
                        reasons = Counter(row[DeadLetterCol.reason] for row in dead_letters)
                        summary.dead_letters.update(reasons)
                        for reason, count in reasons.items():  # labelled once a reason, not once a dead letter
                            metrics.dead_letters.labels(delivery.source, reason).inc(count)
                    parsed = Parsed(rows, delivery, size, isolated)
                    for send in sends:
                        await send.send(parsed)
                context.parsed()

    def _once_each(self, messages: list[Message], context: _Context) -> list[Message]:
        """The batch with each message once: two push requests of one message at once (Pub/Sub
        sending it again while the first waits) share a batch, and the sinks, which drop a
        message they hold already, stored both copies of it."""
        if len({message.message_id for message in messages}) == len(messages):
            return messages
        first: dict[str, Message] = {}
        for message in messages:
            first.setdefault(message.message_id, message)
        self.summary.repeated += len(messages) - len(first)
        context.repeated.inc(len(messages) - len(first))
        return list(first.values())

    def _isolate_suspects(self, messages: list[Message]) -> list[tuple[list[Message], str | None]]:
        """The batch as parts: its innocent messages together, each suspect alone."""
        suspects = [m for m in messages if m.message_id in self._quarantine]
        if not suspects:
            return [(messages, None)]
        rest = [m for m in messages if m.message_id not in self._quarantine]
        parts: list[tuple[list[Message], str | None]] = [(rest, None)] if rest else []
        parts += [([m], m.message_id) for m in suspects]
        return parts

    def _parse_part(self, messages: list[Message], isolated: str | None, source: str, received_us: int) -> RowBatch:
        condemned = self._quarantine.condemned(isolated) if isolated else None
        if condemned is None:
            return self._parser.parse(messages, source, received_us)
        (message,) = messages
        log.error("%s: message %s failed alone %d times; stored as a dead letter: %s",
                  source, message.message_id, condemned.strikes, condemned.error)  # fmt: skip
        return self._parser.unwritable(message, source, received_us, condemned.error)

    def _settled(self, delivery: Delivery, ok: bool) -> None:
        self._in_flight.discard(delivery)
        self.metrics.in_flight.dec(delivery.messages)
        self._contexts[delivery.source].acknowledged[ok].inc(delivery.messages)
        if ok:
            self.summary.acknowledged += delivery.messages
        else:
            self.summary.not_acknowledged += delivery.messages


@asynccontextmanager
async def _lifespan(what: str, lifespan: AbstractAsyncContextManager[None]) -> AsyncIterator[None]:
    """A plugin's ``lifespan``, whose own failure to start or to end is a ``PipelineError`` naming
    it (one line, as other failures are, not a traceback). What the run raises passes unchanged."""
    entered = in_run = False
    try:
        async with lifespan:
            entered = True
            try:
                yield
            except BaseException:
                in_run = True
                raise
    except Exception as exc:
        if in_run or isinstance(exc, PipelineError):
            raise
        when = "failed as it ended" if entered else "could not start"
        raise PipelineError(f"{what} {when}: {describe(exc)}") from exc


def pipeline_error_in(group: BaseExceptionGroup) -> BaseException:
    """The user-facing failure inside a task group's exceptions (or the group itself)."""
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            exc = pipeline_error_in(exc)
        if isinstance(exc, PipelineError):
            return exc
        if isinstance(exc, SinkFailed):
            return PipelineError(str(exc))
    return group
