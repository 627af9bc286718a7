"""In-process fake plugins for runtime unit tests (never used for integration tests)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel

from clickflow.api import (
    AnySink,
    AnySource,
    Message,
    PermanentWriteError,
    RowBatch,
    Sink,
    SinkOptions,
    Source,
    SourceContext,
    SourceOptions,
)
from clickflow.hookspecs import hookimpl
from clickflow.schema import VisitCol


class RecordingSinkContext:
    """A ``SinkContext`` that keeps what a sink tells it."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry

        self.registry = CollectorRegistry()
        self.visits_stored_already = 0

    def stored_already(self, visits: int) -> None:
        self.visits_stored_already += visits


@dataclass
class RecordingAck:
    acked: int = 0
    nacked: list[BaseException] = field(default_factory=list)
    redelivers: bool = False

    def ack(self) -> None:
        self.acked += 1

    def nack(self, error: BaseException) -> None:
        self.nacked.append(error)


class ScriptOptions(SourceOptions):
    batches: int = 1
    per_batch: int = 1
    forever: bool = False
    redelivers: bool = False
    finite: bool = False
    until_parsed: bool = False
    """Wait after each batch until the parser has handed it to the sinks, then call ``on_parsed``."""
    repeat: int = 1
    """Each message this many times in its batch, as push requests of one message at once come."""


class ScriptSource(Source[ScriptOptions]):
    """Emits numbered valid visits; records one acknowledger per batch in ``acks``."""

    type_name = "script"
    acks: list[RecordingAck] = []  # noqa: RUF012 - shared with the test on purpose
    emitted: list[int] = []  # noqa: RUF012
    _waiting: tuple[int, anyio.Event] | None = None
    on_parsed: Callable[[int], None] = staticmethod(lambda number: None)

    @classmethod
    async def wait_for_emitted(cls, count: int) -> None:
        """Return once ``count`` batches have entered the pipeline."""
        if len(cls.emitted) < count:
            cls._waiting = (count, anyio.Event())
            await cls._waiting[1].wait()

    @property
    def finite(self) -> bool:
        return self.options.finite

    async def run(self, context: SourceContext) -> None:
        number = 0
        while self.options.forever or number < self.options.batches:
            messages = [
                Message(json.dumps({"session_id": f"S{number}-{i}"}).encode(), f"{self.name}:{number}:{i}")
                for i in range(self.options.per_batch)
                for _ in range(self.options.repeat)
            ]
            ack = RecordingAck(redelivers=self.options.redelivers)
            ScriptSource.acks.append(ack)
            await context.emit(messages, ack)
            ScriptSource.emitted.append(number)
            if self.options.until_parsed:
                await context.until_parsed()
                ScriptSource.on_parsed(number)
            if ScriptSource._waiting and len(ScriptSource.emitted) >= ScriptSource._waiting[0]:
                ScriptSource._waiting[1].set()
            number += 1
            await anyio.lowlevel.checkpoint()


class RedeliveringOptions(SourceOptions):
    messages: int = 10
    per_batch: int = 5


class RedeliveringSource(Source[RedeliveringOptions]):
    """Like Pub/Sub: what is nacked comes back in a later batch; ends once everything is acked."""

    type_name = "redelivering"
    deliveries = 0

    async def run(self, context: SourceContext) -> None:
        pending = [Message(json.dumps({"session_id": f"S{n}"}).encode(), f"m{n}") for n in range(self.options.messages)]
        unsettled = 0
        done = anyio.Event()

        class Ack:
            redelivers = True

            def __init__(self, messages: list[Message]) -> None:
                self.messages = messages

            def ack(self) -> None:
                settle()

            def nack(self, error: BaseException) -> None:
                pending.extend(self.messages)
                settle()

        def settle() -> None:
            nonlocal unsettled
            unsettled -= 1
            if not pending and not unsettled:
                done.set()

        while pending or unsettled:
            if not pending:
                with anyio.move_on_after(0.05):
                    await done.wait()
                continue
            batch, pending[:] = pending[: self.options.per_batch], pending[self.options.per_batch :]
            unsettled += 1
            RedeliveringSource.deliveries += 1
            await context.emit(batch, Ack(batch))


class FailingSourceOptions(SourceOptions):
    pass


class FailingSource(Source[FailingSourceOptions]):
    type_name = "failing"

    async def run(self, context: SourceContext) -> None:
        raise FileNotFoundError("no such file: visits.jsonl")


class MemoryOptions(SinkOptions):
    fail_first: int = 0
    permanent: bool = False
    """Its failures are ``PermanentWriteError``s."""
    gated: bool = False
    poison: str | None = None
    """Fail every write holding a ``visits`` row of this message id (a row the sink cannot take)."""
    textless: bool = False
    """Its failures have no text, as a client's timeout (``TimeoutError()``) has none."""
    fail_open: bool = False


class TrackedBatch(RowBatch):
    """A RowBatch that counts the runtime's ``discard`` calls."""

    discarded = 0

    def discard(self) -> None:
        self.discarded += 1


class MemorySink(Sink[MemoryOptions, TrackedBatch]):
    """Keeps written batches in ``writes``; can fail its first writes or wait for ``gate``."""

    type_name = "memory"
    writes: list[tuple[str, RowBatch]] = []  # noqa: RUF012
    gate: anyio.Event | None = None
    written: anyio.Event | None = None
    """Set after the first successful write, when a test created it."""
    attempts = 0
    closed = 0

    async def open(self) -> None:
        if self.options.fail_open:
            raise ConnectionError("cannot connect")

    async def close(self) -> None:
        MemorySink.closed += 1

    def new_batch(self) -> TrackedBatch:
        return TrackedBatch()

    async def write(self, batch: TrackedBatch) -> None:
        MemorySink.attempts += 1
        if MemorySink.attempts <= self.options.fail_first:
            if self.options.textless:
                raise TimeoutError
            if self.options.permanent:
                raise PermanentWriteError(f"table missing (attempt {MemorySink.attempts})")
            raise ConnectionError(f"sink unavailable (attempt {MemorySink.attempts})")
        poison = self.options.poison
        if poison and any(row[VisitCol.message_id] == poison for row in batch.tables["visits"]):
            if self.options.textless:
                raise TimeoutError
            raise ValueError(f"cannot store message {poison}")
        if self.options.gated:
            assert MemorySink.gate is not None
            await MemorySink.gate.wait()
        MemorySink.writes.append((self.name, batch))
        if MemorySink.written is not None:
            MemorySink.written.set()


def reset() -> None:
    ScriptSource.acks, ScriptSource.emitted, ScriptSource._waiting = [], [], None
    ScriptSource.on_parsed = staticmethod(lambda number: None)
    MemorySink.writes, MemorySink.gate, MemorySink.written, MemorySink.attempts = [], None, None, 0
    MemorySink.closed = 0
    RedeliveringSource.deliveries = 0


@hookimpl
def register_sources(register: Callable[[type[AnySource]], None]) -> None:
    register(ScriptSource)
    register(FailingSource)
    register(RedeliveringSource)


@hookimpl
def register_sinks(register: Callable[[type[AnySink]], None]) -> None:
    register(MemorySink)


def counts(writes: list[tuple[str, RowBatch]], sink: str) -> dict[str, int]:
    total: dict[str, Any] = {}
    for name, batch in writes:
        if name == sink:
            for table, n in batch.counts().items():
                total[table] = total.get(table, 0) + n
    return total
