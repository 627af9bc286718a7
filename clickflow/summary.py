"""What a run reports, whichever runtime ran it (the async one or Beam): counts and progress."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class RunSummary:
    messages: Counter[str] = field(default_factory=Counter)
    """Messages received, per source."""
    repeated: int = 0
    """Messages that came again in the batch they were in, and were parsed once."""
    rows: Counter[str] = field(default_factory=Counter)
    """Rows produced, per table (dead_letter included)."""
    dead_letters: Counter[str] = field(default_factory=Counter)
    """Dead letters, per reason."""
    stored_already: Counter[str] = field(default_factory=Counter)
    """Visits each sink found stored already, and did not store again, where it can tell (DuckDB, load jobs)."""
    acknowledged: int = 0
    not_acknowledged: int = 0
    seconds: float = 0.0
    unfinished: list[str] = field(default_factory=list)
    """Finite sources that were stopped before the end of their input."""

    @property
    def events_per_second(self) -> float:
        return self.rows["events"] / self.seconds if self.seconds else 0.0


@dataclass
class Progress:
    """How far a source is through its input, as it last reported (``SourceContext.progress``)."""

    done: int
    total: int | None = None
    """None when the end is unknown (a subscription's backlog, endless traffic)."""
    unit: str = "messages"
    """What ``done`` and ``total`` count, e.g. ``files`` or ``visits``."""
    bytes_read: int = 0
