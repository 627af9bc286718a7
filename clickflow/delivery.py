"""Acknowledge-after-sink bookkeeping, and the per-sink batching worker.

A source batch becomes a ``Delivery`` that every sink must confirm. It is
acknowledged once the last sink has durably written all its rows (dead letters
included) and negatively acknowledged as soon as any sink gives up on it.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import anyio
import anyio.abc
from anyio.abc import ObjectReceiveStream

from clickflow.api import Acknowledger, AnySink, PermanentWriteError, RowBatch, SinkBatch
from clickflow.logs import describe
from clickflow.metrics import Metrics
from clickflow.options import BatchLimits, RetryPolicy
from clickflow.quarantine import Quarantine
from clickflow.schema import TABLE_NAMES

log = logging.getLogger(__name__)


class SinkFailed(Exception):
    """A sink kept failing after every retry; the run must stop."""

    def __init__(self, sink: str, cause: BaseException) -> None:
        super().__init__(f"sink {sink!r} failed: {describe(cause)}")
        self.sink = sink
        self.cause = cause


class Delivery:
    """One batch of source messages on its way through every sink; settled exactly once."""

    __slots__ = ("_ack", "_on_settled", "_pending", "eager", "message_ids", "messages", "settled", "source")

    def __init__(
        self,
        source: str,
        ack: Acknowledger,
        messages: int,
        sinks: int,
        on_settled: Callable[[Delivery, bool], None],
        message_ids: list[str] | None = None,
        eager: bool = False,
    ) -> None:
        self.source = source
        self.messages = messages
        self.message_ids = message_ids
        """Kept for redelivering sources only: they become suspects if a sink cannot write them."""
        self.eager = eager
        """From an eager source (``Source.eager``: a file, the push endpoint): its rows are written
        as soon as the sink is free, whatever ``max_age``."""
        self.settled = False
        self._ack = ack
        self._pending = sinks
        self._on_settled = on_settled

    def split(self, parts: int) -> None:
        """The batch travels as ``parts`` parsed parts, each confirmed by every sink."""
        self._pending *= parts

    def sink_done(self) -> None:
        self._pending -= 1
        if self._pending == 0 and not self.settled:
            self.settled = True
            self._ack.ack()
            self._on_settled(self, True)

    @property
    def redelivers(self) -> bool:
        return bool(getattr(self._ack, "redelivers", False))

    def fail(self, error: BaseException) -> None:
        if not self.settled:
            self.settled = True
            self._ack.nack(error)
            self._on_settled(self, False)


@dataclass(slots=True)
class Parsed:
    """The rows parsed from one delivery, as handed to each sink."""

    rows: RowBatch
    delivery: Delivery
    size: int
    """Bytes of the raw messages; a cheap stand-in for the rows' size."""
    isolated: str | None = None
    """The id of a suspect message, written in a batch of its own (see ``clickflow.quarantine``)."""


class SinkWorker:
    """Feeds one sink: gathers parsed batches until a limit is reached, writes with retries.

    One write runs at a time, in the background, so the next batch is gathered
    (and the parser keeps working) while the previous one is being written. A batch
    that reaches ``max_age`` while the sink is still writing keeps gathering until
    the sink is free (group commit): with a short ``max_age``, a lone message is
    written at once and, under load, each write takes everything that arrived
    during the one before. Rows from an eager source skip ``max_age``: a file's input
    is all there, so waiting gathers nothing a busy sink would not gather anyway, and a
    sink left idle while the first batch fills is time lost; a push request's sender
    waits for its answer, so waiting is latency (and billed time on Cloud Run).
    """

    def __init__(
        self, sink: AnySink, limits: BatchLimits, retry: RetryPolicy, metrics: Metrics, quarantine: Quarantine
    ) -> None:
        self.sink = sink
        self._limits = limits
        self._retry = retry
        self._metrics = metrics
        self._quarantine = quarantine
        self._last_failure: str | None = None
        """Since the last successful write: "" after a failed batch, or the isolated message that failed."""
        self._batch: SinkBatch | None = None
        """Made by the sink when the first rows arrive: after ``open``, which may set up what it needs."""
        self._deliveries: list[Delivery] = []
        self._isolated: str | None = None
        self._spool_error: OSError | None = None
        self._rows = 0
        self._bytes = 0
        self._deadline = 0.0
        self._writing = anyio.Semaphore(1)
        self._until_written: anyio.CancelScope | None = None
        """Set while a batch past its ``max_age`` waits for the write before it to end."""
        self._failing_since: float | None = None
        self._write_seconds = metrics.write_seconds.labels(sink.name)
        self._rows_written = {table: metrics.rows_written.labels(sink.name, table) for table in TABLE_NAMES}
        """Labelled once: ``labels()`` takes microseconds, and a busy sink writes hundreds of times a second."""

    async def run(self, receive: ObjectReceiveStream[Parsed]) -> None:
        async with receive, anyio.create_task_group() as writes:
            while True:
                try:
                    item = await self._next(receive)
                except anyio.EndOfStream:
                    break
                if item is not None and item.isolated:
                    await self._start_write(writes)  # a suspect goes in a batch of its own
                if item is not None:
                    self._add(item)
                full = self._rows >= self._limits.max_rows or self._bytes >= self._limits.max_bytes
                if item is None or full or self._isolated or self._spool_error:
                    await self._start_write(writes)
            await self._start_write(writes)

    async def _next(self, receive: ObjectReceiveStream[Parsed]) -> Parsed | None:
        """The next batch, or None once the oldest gathered batch reaches ``max_age`` and the
        sink is free to write it."""
        if not self._deliveries:
            return await receive.receive()
        remaining = self._deadline - anyio.current_time()
        if remaining > 0:
            with anyio.move_on_after(remaining):
                return await receive.receive()
        if self._writing.value:
            return None
        self._until_written = anyio.CancelScope()  # cancelled when the write ends
        try:
            with self._until_written:
                return await receive.receive()
        finally:
            self._until_written = None
        return None

    def _add(self, item: Parsed) -> None:
        deadline = anyio.current_time()
        if not item.delivery.eager:
            deadline += self._limits.max_age.total_seconds()
        if not self._deliveries or deadline < self._deadline:
            self._deadline = deadline
        self._isolated = item.isolated
        self._deliveries.append(item.delivery)
        try:
            if self._batch is None:
                self._batch = self.sink.new_batch()
            self._batch.add(item.rows)
        except OSError as exc:  # e.g. a full disk under a spool: this batch cannot be written
            self._spool_error = exc
        self._rows += len(item.rows)
        self._bytes += item.size

    async def _start_write(self, writes: anyio.abc.TaskGroup) -> None:
        if not self._deliveries:
            return
        await self._writing.acquire()
        batch, deliveries, isolated, spool_error = self._batch, self._deliveries, self._isolated, self._spool_error
        self._batch, self._deliveries, self._rows, self._bytes = None, [], 0, 0
        self._isolated = self._spool_error = None
        if batch is None or spool_error is not None:  # no batch: making it failed, with a spool error
            self._writing.release()
            if batch is not None:
                batch.discard()
            self._metrics.write_failures.labels(self.sink.name).inc()
            self._give_back(deliveries, spool_error or OSError("the sink made no batch"), isolated)
            return
        writes.start_soon(self._write, batch, deliveries, isolated)

    async def _write(self, batch: SinkBatch, deliveries: list[Delivery], isolated: str | None) -> None:
        try:
            await self.write_with_retries(batch, deliveries, isolated)
        finally:
            self._writing.release()
            if self._until_written is not None:
                self._until_written.cancel()

    async def write_with_retries(
        self, batch: SinkBatch, deliveries: list[Delivery], isolated: str | None = None
    ) -> None:
        name = self.sink.name
        backoff = self._retry.initial_backoff.total_seconds()
        started = anyio.current_time()
        for attempt in range(1, self._retry.attempts + 1):
            try:
                await self.sink.write(batch)
                break
            except Exception as exc:
                self._metrics.write_failures.labels(name).inc()
                if attempt == self._retry.attempts or isinstance(exc, PermanentWriteError):
                    batch.discard()
                    self._give_back(deliveries, exc, isolated)
                    return
                why = describe(exc)
                log.warning("sink %s: write failed (attempt %d of %d): %s", name, attempt, self._retry.attempts, why)
                await anyio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, self._retry.max_backoff.total_seconds())
        self._failing_since = self._last_failure = None
        if isolated:
            self._quarantine.clear(isolated)
        self._write_seconds.observe(anyio.current_time() - started)
        for table, count in batch.counts().items():
            if count:
                (self._rows_written.get(table) or self._metrics.rows_written.labels(name, table)).inc(count)
        batch.discard()
        for delivery in deliveries:
            delivery.sink_done()

    def _give_back(self, deliveries: list[Delivery], error: Exception, isolated: str | None) -> None:
        """Nack a batch the sink could not write; fatal unless its sources redeliver.

        Its messages become suspects; a suspect that fails alone gets a strike, unless another
        message failed alone since the sink last worked (then the sink is failing, not the message).
        """
        if isolated is None:
            for delivery in deliveries:
                if delivery.message_ids:
                    self._quarantine.suspect(delivery.message_ids)
        elif self._last_failure in (None, isolated):
            self._quarantine.strike(isolated, f"sink {self.sink.name!r}: {describe(error)}")
        self._last_failure = isolated or ""
        for delivery in deliveries:
            delivery.fail(error)
        now = anyio.current_time()
        if self._failing_since is None:
            self._failing_since = now
        survivable = all(d.redelivers for d in deliveries)
        if not survivable or now - self._failing_since > self._retry.give_up_after.total_seconds():
            raise SinkFailed(self.sink.name, error) from error
        log.error("sink %s: giving the batch back for redelivery after %d attempts: %s",
                  self.sink.name, self._retry.attempts, describe(error))  # fmt: skip
