"""Dead letters you can act on: list them, and replay them through today's parser.

A sink that keeps dead letters where they can be read again (DuckDB, BigQuery) implements
``DeadLetterStore``. ``replay`` reads the stored dead letters of the first such sink, parses their
payloads again (a whole message with ``VisitParser.parse``, one event with ``parse_event`` in its
stored visit's context), stores what now parses in every such sink, skipping rows stored before
(same keys as a first delivery), and only then marks the dead letters replayed. A crash between the
two leaves them unmarked, and the next replay stores nothing twice and marks them. A replay run
twice does nothing the second time. It goes a page of dead letters at a time (``PAGE_ROWS``,
``PAGE_BYTES``), each stored and marked before the next is read, so memory stays bounded however
many there are; it reads those received before it began, not the dead letters it makes.

``dead_letter_id`` tells what a dead letter holds: ``VISIT_ID`` a whole message, ``VISIT_ID:INDEX``
one event of a stored visit, ``TABLE/KEY`` a row a sink refused (not parsed again: its payload is a
row, not a message).
"""

from __future__ import annotations

import base64
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from clickflow.api import Message, RowBatch
from clickflow.parser import VisitContext, VisitParser, visit_id_for
from clickflow.rejections import REASON_TOO_LARGE
from clickflow.schema import DeadLetterCol

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

_EVENT_INDEX = DeadLetterCol.event_index


@dataclass(frozen=True)
class DeadLetterQuery:
    """Which dead letters: not yet replayed, of these reasons (all if empty), received since a time
    (and before one: a replay reads those received before it began, not those it makes)."""

    reasons: tuple[str, ...] = ()
    since_us: int | None = None
    until_us: int | None = None


@dataclass(frozen=True)
class StoredDeadLetter:
    dead_letter_id: str
    received_at_us: int
    source: str
    message_id: str
    event_index: int | None
    reason: str
    payload: bytes
    """Decoded from the stored text and its ``payload_encoding``."""
    payload_bytes: int | None
    """The original's size; larger than ``payload`` when only its head was kept. None in rows stored
    before the column existed."""

    @classmethod
    def from_stored(
        cls, dead_letter_id: str, received_at_us: int, source: str, message_id: str, event_index: int | None,
        reason: str, payload: str, encoding: str, payload_bytes: int | None,
    ) -> StoredDeadLetter:  # fmt: skip
        data = base64.b64decode(payload) if encoding == "base64" else payload.encode("utf-8", "surrogateescape")
        return cls(dead_letter_id, received_at_us, source, message_id, event_index, reason, data, payload_bytes)

    def why_not_replayable(self) -> str | None:
        if "/" in self.dead_letter_id:
            return "a row a sink refused, not a message: fix the row or the table"
        complete = len(self.payload) >= self.payload_bytes if self.payload_bytes is not None else None
        if complete is False or (complete is None and self.reason == REASON_TOO_LARGE):
            return f"only the head of the message is kept: send message {self.message_id} again from its source"
        return None


@dataclass(frozen=True)
class DeadLetterGroup:
    """Dead letters of one reason and source, with a sample."""

    reason: str
    source: str
    count: int
    first_us: int
    last_us: int
    sample_message_id: str
    sample_error: str


@dataclass
class DeadLetterPage:
    letters: list[StoredDeadLetter]
    held_back: int = 0
    """Matching dead letters left out because they cannot be marked yet (BigQuery's streaming
    buffer); given with the first page."""


PAGE_ROWS = 5000
PAGE_BYTES = 32 << 20
"""A page of dead letters holds at most this many, and stops at the one whose payload takes it to
this many bytes: a day of a broken client's dead letters is read a page at a time (read whole,
300,000 of them failed DuckDB's ``memory_limit``)."""


@runtime_checkable
class DeadLetterStore(Protocol):
    """A sink whose dead letters can be read, replayed and marked (``clickflow dlq``); called after
    ``open``."""

    async def dead_letter_groups(self, query: DeadLetterQuery) -> list[DeadLetterGroup]:
        """Counts by reason and source, largest first."""

    def dead_letters(self, query: DeadLetterQuery) -> AsyncIterator[DeadLetterPage]:
        """The dead letters themselves, oldest first, in pages of ``PAGE_ROWS`` and about
        ``PAGE_BYTES`` at most; those of a page may be marked before the next is asked for."""

    async def visit_contexts(self, visit_ids: list[str]) -> dict[str, VisitContext]:
        """What the stored visits of these ids give their events."""

    async def store_replayed(self, rows: RowBatch) -> None:
        """Store the rows whose keys are not stored yet, in every table."""

    async def mark_replayed(self, dead_letter_ids: list[str], at_us: int) -> None:
        """Set ``replayed_at`` on these dead letters."""


@dataclass
class ReplayReport:
    replayed: Counter[str] = field(default_factory=Counter)
    """By reason: dead letters whose payload now parses, stored and marked."""
    still_failing: Counter[str] = field(default_factory=Counter)
    not_replayable: Counter[str] = field(default_factory=Counter)
    rows: Counter[str] = field(default_factory=Counter)
    """Rows the replay made, per table (stored unless a dry run; rows stored before are skipped)."""
    held_back: int = 0
    notes: list[str] = field(default_factory=list)

    def registry(self) -> CollectorRegistry:
        """The outcome as Prometheus metrics, e.g. for a textfile collector."""
        from prometheus_client import CollectorRegistry, Counter

        registry = CollectorRegistry()
        for name, counts, doc in (
            ("clickflow_dlq_replayed", self.replayed, "Dead letters replayed and stored"),
            ("clickflow_dlq_still_failing", self.still_failing, "Dead letters the parser still rejects"),
            ("clickflow_dlq_not_replayable", self.not_replayable, "Dead letters that cannot be parsed again"),
        ):
            family = Counter(name, doc, ["reason"], registry=registry)
            for reason, count in counts.items():
                family.labels(reason).inc(count)
        return registry


async def replay(
    stores: Sequence[DeadLetterStore], query: DeadLetterQuery, parser: VisitParser, *, dry_run: bool = False
) -> ReplayReport:
    """Parse the stored dead letters again and store what now parses (see the module's docstring),
    a page at a time: each page's rows are stored, then its dead letters marked, before the next."""
    report = ReplayReport()
    now = time.time_ns() // 1000
    async for page in stores[0].dead_letters(replace(query, until_us=now)):
        report.held_back += page.held_back
        await _replay_page(stores, page.letters, parser, report, now, dry_run)
    return report


async def _replay_page(
    stores: Sequence[DeadLetterStore], letters: list[StoredDeadLetter], parser: VisitParser, report: ReplayReport,
    now: int, dry_run: bool,
) -> None:  # fmt: skip
    rows, replayed = RowBatch(), []
    messages: dict[str, list[StoredDeadLetter]] = {}
    events: list[StoredDeadLetter] = []
    for letter in letters:
        why = letter.why_not_replayable()
        if why:
            report.not_replayable[letter.reason] += 1
            report.notes.append(f"{letter.dead_letter_id} ({letter.reason}): {why}")
        elif letter.event_index is None:
            messages.setdefault(letter.source, []).append(letter)
        else:
            events.append(letter)

    for source, of_source in messages.items():
        parsed = parser.parse([Message(letter.payload, letter.message_id) for letter in of_source], source, now)
        failing = {row[DeadLetterCol.dead_letter_id] for row in parsed.tables["dead_letter"]}
        for letter in of_source:
            if letter.dead_letter_id in failing:
                report.still_failing[letter.reason] += 1
            else:
                report.replayed[letter.reason] += 1
                replayed.append(letter.dead_letter_id)
        # its events' dead letters are new (the message never got that far); its own are stored already
        parsed.tables["dead_letter"] = [r for r in parsed.tables["dead_letter"] if r[_EVENT_INDEX] is not None]
        rows.add(parsed)

    first = stores[0]
    visit_ids = sorted({visit_id_for(letter.message_id) for letter in events})
    contexts = await first.visit_contexts(visit_ids) if visit_ids else {}
    for letter in events:
        context = contexts.get(visit_id_for(letter.message_id))
        if context is None:
            report.not_replayable[letter.reason] += 1
            report.notes.append(f"{letter.dead_letter_id} ({letter.reason}): its visit is not stored")
            continue
        assert letter.event_index is not None
        parsed = parser.parse_event(letter.payload, context, letter.message_id, letter.event_index, letter.source, now)
        if parsed.tables["dead_letter"]:
            report.still_failing[letter.reason] += 1
            continue
        report.replayed[letter.reason] += 1
        replayed.append(letter.dead_letter_id)
        rows.add(parsed)

    report.rows.update(rows.counts())
    if not dry_run and replayed:
        for store in stores:
            await store.store_replayed(rows)
        for store in stores:
            await store.mark_replayed(replayed, now)
