"""The interfaces a plugin implements: sources, sinks and their options.

A plugin's public face is a class with a ``type_name``, an ``Options`` model and
ordinary async methods. Pluggy only registers the classes; the hot path never
goes through it.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Container, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, get_args

from typing_extensions import TypeVar

from clickflow.options import PluginOptions, SinkOptions, SourceOptions
from clickflow.schema import TABLE_NAMES, TABLES, DeadLetterCol, EventCol, ItemCol, VisitCol

if TYPE_CHECKING:
    from aiohttp import web
    from prometheus_client import CollectorRegistry


@dataclass(slots=True)
class Message:
    """One raw visit message as a source received it."""

    data: bytes
    message_id: str
    """Stable across redeliveries, so derived row ids are deterministic."""


PART_BYTES = 4 << 20
"""The most bytes of messages parsed and handed to the sinks at once: rows cost up to about eleven
times their message (a visit of 50,000 events that each repeat ids of 256 characters), and the
channels between the stages count batches, not bytes. A batch of ordinary visits (a thousand of
about 2 KB) is one part."""


def parts_of(messages: list[Message]) -> list[tuple[list[Message], int]]:
    """``messages`` in order, in parts of at most ``PART_BYTES`` (a larger message alone), each with
    its bytes. The runtime parses a batch so; a source whose batches can be large (a pull response)
    emits them so, and the channels then hold no more."""
    sizes = [len(message.data) for message in messages]
    if (total := sum(sizes)) <= PART_BYTES:
        return [(messages, total)]
    parts, start, size = [], 0, 0
    for end, message_size in enumerate(sizes):
        if size + message_size > PART_BYTES and end > start:
            parts.append((messages[start:end], size))
            start, size = end, 0
        size += message_size
    parts.append((messages[start:], size))
    return parts


def content_id(place: str, data: bytes) -> str:
    """A message id for a source whose messages come without one (a file's lines, the simulator's
    visits): where the message is, then ``#`` and 16 hex digits of its bytes' SHA-256 (1.4 µs a
    visit of 1.4 KB, on the CPU's SHA instructions). The same message read again has the same id,
    and the sinks drop it as stored; other bytes in the same place have another, and are stored.
    By place alone, a file rewritten under its name, or a seeded simulator run at another time,
    was dropped whole as stored already."""
    return f"{place}#{hashlib.sha256(data).hexdigest()[:16]}"


def valid_text(text: str) -> str:
    """``text`` with what is not UTF-8 (surrogate escapes, from a file name or an HTTP header) as
    ``\\xNN``: a message id becomes row values, which every sink must be able to encode."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


class PermanentWriteError(Exception):
    """Raised by a sink's ``write`` for a failure that would recur unchanged (an invalid request, a
    missing table, a denied permission): the batch is given up at once instead of retried."""


class Acknowledger(Protocol):
    """Settles a batch of messages once the sinks have (or have not) stored them.

    Both methods must return quickly; a source that needs I/O to settle queues it.
    ``redelivers`` says whether a nacked batch comes back (Pub/Sub) or is gone
    (files): a sink failure is survivable only in the first case.
    """

    redelivers: bool

    def ack(self) -> None: ...

    def nack(self, error: BaseException) -> None: ...


class NoAck:
    """For sources that cannot redeliver (files, the simulator)."""

    redelivers = False

    def ack(self) -> None:
        pass

    def nack(self, error: BaseException) -> None:
        pass


_DEAD_LETTER_ID, _EVENT_INDEX = int(DeadLetterCol.dead_letter_id), int(DeadLetterCol.event_index)


@dataclass(slots=True)
class RowBatch:
    """Rows for each analytic table, as tuples in the schema's column order."""

    tables: dict[str, list[tuple[Any, ...]]] = field(default_factory=lambda: {name: [] for name in TABLE_NAMES})

    def add(self, other: RowBatch) -> None:
        for name, rows in other.tables.items():
            self.tables[name].extend(rows)

    def __len__(self) -> int:
        return sum(len(rows) for rows in self.tables.values())

    def counts(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in self.tables.items()}

    def discard(self) -> None:
        pass

    def message_keys(self) -> list[str]:
        """A key for each message these rows came from, the same on every delivery: an accepted
        visit's id, or a whole-message dead letter's id (its visit id)."""
        tables = self.tables
        keys = [row[VisitCol.visit_id] for row in tables["visits"]]
        keys += [row[_DEAD_LETTER_ID] for row in tables["dead_letter"] if row[_EVENT_INDEX] is None]
        return keys

    def without_messages(self, keys: Container[str]) -> RowBatch:
        """These rows but those from the messages whose ``message_keys`` are in ``keys``."""
        tables = self.tables
        return RowBatch({
            "visits": [r for r in tables["visits"] if r[VisitCol.visit_id] not in keys],
            "events": [r for r in tables["events"] if r[EventCol.visit_id] not in keys],
            "purchase_items": [r for r in tables["purchase_items"] if r[ItemCol.visit_id] not in keys],
            "dead_letter": [r for r in tables["dead_letter"] if r[_DEAD_LETTER_ID].partition(":")[0] not in keys],
        })  # fmt: skip

    def dicts(self, table: str) -> Iterator[dict[str, Any]]:
        """Rows of one table as dicts; convenient for simple sinks, slower than tuples."""
        names = TABLES[table].column_names
        for row in self.tables[table]:
            yield dict(zip(names, row, strict=True))


class SinkBatch(Protocol):
    """What a sink gathers rows into between writes: a RowBatch unless the sink says otherwise."""

    def add(self, rows: RowBatch) -> None:
        """Take in the rows of one parsed batch (do not keep a reference to ``rows``)."""

    def __len__(self) -> int:
        """Rows gathered so far."""

    def counts(self) -> dict[str, int]:
        """Rows gathered so far, per table."""

    def discard(self) -> None:
        """Release what the batch holds; called once it is done with: written, or given up.
        Until then it is kept as it is, for the write's retries."""


class SourceContext(Protocol):
    """What the runtime gives a running source."""

    registry: CollectorRegistry
    """Where a source may register metrics of its own; served on ``/metrics``."""

    async def emit(self, messages: list[Message], ack: Acknowledger) -> None:
        """Hand a batch to the parser; waits while the pipeline is full (backpressure)."""

    async def until_parsed(self) -> None:
        """Wait until the parser has handed every batch this source emitted to the sinks. A source
        that coalesces (the push endpoint) gathers the next batch meanwhile, so a busy pipeline
        takes fewer, larger batches."""

    def heartbeat(self, loop: str = "") -> None:
        """Prove a loop of the source is alive; feeds ``/healthz``. Name loops that run side by side."""

    def progress(self, done: int, total: int | None = None, *, unit: str = "messages", bytes_read: int = 0) -> None:
        """Report how far through its input the source is, for the terminal display: ``done`` of
        ``total`` (None: unknown) things counted in ``unit`` (``files``, ``visits``), and bytes read."""


Handler = Callable[["web.Request"], Awaitable["web.StreamResponse"]]


SourceOptionsT = TypeVar("SourceOptionsT", bound=SourceOptions)
SinkOptionsT = TypeVar("SinkOptionsT", bound=SinkOptions)
BatchT = TypeVar("BatchT", bound=SinkBatch, default=RowBatch)


OptionsT = TypeVar("OptionsT", bound=PluginOptions)


def _options_argument(cls: type, base: type[OptionsT]) -> type[OptionsT] | None:
    """The options class a plugin class names in its own generic base, e.g. ``Sink[MyOptions]``
    (None for a subclass of a concrete plugin, which inherits its parent's or sets its own)."""
    if "Options" in cls.__dict__:
        return None
    for parent in cls.__dict__.get("__orig_bases__", ()):
        for argument in get_args(parent):
            if isinstance(argument, type) and issubclass(argument, base):
                return argument
    return None


class Source(abc.ABC, Generic[SourceOptionsT]):
    """Produces raw messages. Finite sources return from ``run`` when exhausted.

    Declare the options once, as the type argument: ``class MySource(Source[MySourceOptions])``
    types ``self.options`` and sets ``Options``, the model the pipeline file is validated against.
    """

    type_name: ClassVar[str]
    Options: ClassVar[type[SourceOptions]]
    beam: ClassVar[str | None] = None
    """``module:Class`` of its Beam translation (a ``clickflow.beam.BeamRead``), imported only by
    ``clickflow run --runner beam|dataflow``; None means the source cannot run on Beam."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        options = _options_argument(cls, SourceOptions)
        if options is not None:
            cls.Options = options

    def __init__(self, name: str, options: SourceOptionsT) -> None:
        self.name = name
        self.options = options

    def routes(self) -> list[tuple[str, str, Handler]]:
        """``(method, path, handler)`` to mount on the monitoring server before it starts."""
        return []

    @property
    def finite(self) -> bool:
        """Whether ``run`` returns by itself at the end of its input: stopping such a source
        earlier leaves input unread, and the run says so (exit 3) instead of reporting success."""
        return False

    @property
    def eager(self) -> bool:
        """Whether sinks write this source's rows as soon as they are free, whatever their
        ``max_age``. A finite source's are, by default: its input is all there, so waiting would
        only leave the sink idle (a finite source whose input arrives over time, such as a
        throttled simulator, says it is not). So are those of a source whose senders wait for each
        answer (``pubsub_push``): waiting would only add latency, and on Cloud Run billed time.
        Either way a busy sink still gathers what arrives during each write."""
        return self.finite

    @asynccontextmanager
    async def lifespan(self, context: SourceContext) -> AsyncIterator[None]:
        """Resources that outlive ``run``: entered before it, left once every sink is flushed.

        A source that acknowledges over the network keeps its acknowledger alive here,
        so the acknowledgements of a draining pipeline still reach the server.
        """
        yield

    @abc.abstractmethod
    async def run(self, context: SourceContext) -> None:
        """Emit batches until exhausted or cancelled. Cancellation must be safe at any await."""


class SinkContext(Protocol):
    """What the runtime gives a sink for its lifespan."""

    registry: CollectorRegistry
    """Where a sink may register metrics of its own; served on ``/metrics``."""

    def stored_already(self, visits: int) -> None:
        """Say that writes found ``visits`` stored already and did not store them again (an input
        read again, a redelivery): the run's summary and ``clickflow_visits_stored_already`` count
        them, so that a run which parsed visits but stored none of them does not look as if it had."""


class Sink(abc.ABC, Generic[SinkOptionsT, BatchT]):
    """Writes row batches durably. ``write`` returning means the rows are stored.

    ``class MySink(Sink[MySinkOptions])`` gathers rows in a ``RowBatch``; a sink that gathers them
    its own way names its batch type too, ``Sink[MySinkOptions, MyBatch]``, and makes it in
    ``new_batch``.
    """

    type_name: ClassVar[str]
    Options: ClassVar[type[SinkOptions]]
    beam: ClassVar[str | None] = None
    """``module:Class`` of its Beam translation (a ``clickflow.beam.BeamWrite``); see ``Source.beam``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        options = _options_argument(cls, SinkOptions)
        if options is not None:
            cls.Options = options

    def __init__(self, name: str, options: SinkOptionsT) -> None:
        self.name = name
        self.options = options

    def routes(self) -> list[tuple[str, str, Handler]]:
        """``(method, path, handler)`` to mount on the monitoring server, as ``Source.routes``."""
        return []

    async def open(self) -> None:
        """Connect and create tables; called once, before the first ``new_batch``. If it fails,
        ``close`` is called all the same, to release what it made before it failed."""

    @asynccontextmanager
    async def lifespan(self, context: SinkContext) -> AsyncIterator[None]:
        """Background work beside the writes (e.g. notifications): entered after ``open``, left
        after the last write and before ``close``."""
        yield

    def new_batch(self) -> BatchT:
        """An empty batch to gather rows into, made after ``open``. The default is a ``RowBatch``;
        a sink with a batch type of its own makes it here."""
        return RowBatch()  # type: ignore[return-value]  # BatchT is RowBatch unless overridden

    @abc.abstractmethod
    async def write(self, batch: BatchT) -> None:
        """Store every row of a batch from ``new_batch`` or raise.

        Returning means the rows are durable. Must be idempotent: rows seen before
        (same keys) are not stored twice.
        """

    async def close(self) -> None:
        """Release resources; called once, after the last write, or after ``open`` failed (so
        with only part of what ``open`` makes, or none of it)."""


AnySource = Source[Any]
"""A source of any options: what the registry and the runtime hold."""
AnySink = Sink[Any, Any]
"""A sink of any options and batch type."""
