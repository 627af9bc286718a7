"""Event-time aggregates of the rows the parser produced, in bounded memory.

Page views, purchases and revenue are counted in tumbling one-minute windows of
``event_timestamp``. The watermark is the latest event time seen minus the allowed
lateness; a window whose end is behind the watermark is *closed* (complete) and
an event for a window already closed or dropped is counted as late instead. Events
more than ``max_future`` ahead of the wall clock are counted apart, so one bogus
timestamp cannot move the watermark and close every window. Only the newest
``keep_minutes`` windows are kept.

Every labelled count is capped (``TopCounter``): past ``cap`` distinct keys, new
keys go to ``other``, so a flood of unique page URLs or device names costs neither
memory nor metric labels.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from clickflow.schema import DEAD_LETTER, EVENTS, VISITS

MINUTE_US = 60_000_000
OTHER = "other"

_EVENT_TYPE, _EVENT_TS, _PAGE_URL, _AMOUNT = (
    EVENTS.index(c) for c in ("event_type", "event_timestamp", "page_url", "amount")
)
_DEVICE, _VISIT_END, _VISIT_INGESTED = map(VISITS.index, ("device_type", "visit_end", "ingested_at"))
_REASON = DEAD_LETTER.index("reason")


def minute_text(start_us: int) -> str:
    """A window's start as RFC 3339 text, as the JSON endpoint and the webhook give it."""
    return datetime.fromtimestamp(start_us // 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TopCounter(Counter[str]):
    """A Counter of at most ``cap`` keys plus ``other``."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def count(self, key: str | None, n: int = 1) -> None:
        key = key if key is not None else "(none)"
        if key in self or len(self) < self.cap:
            self[key] += n
        else:
            self[OTHER] += n

    def add_all(self, keys: list[str | None]) -> None:
        """Count many keys at once: C speed while under the cap."""
        if len(self) + len(set(keys)) <= self.cap:
            self.update(k if k is not None else "(none)" for k in keys)
        else:
            for key in keys:
                self.count(key)


@dataclass
class Minute:
    """One tumbling window."""

    start_us: int
    page_views: int = 0
    purchases: int = 0
    revenue: float = 0.0
    pages: TopCounter = field(default_factory=lambda: TopCounter(0))


@dataclass
class LiveAggregates:
    """What the dashboard and the alerts read; fed one parsed batch at a time."""

    allowed_lateness_us: int = 60_000_000
    keep_minutes: int = 60
    max_pages: int = 1000
    max_future_us: int = 300_000_000
    minutes: dict[int, Minute] = field(default_factory=dict)
    watermark_us: int | None = None
    max_event_us: int | None = None
    late_events: int = 0
    future_events: int = 0
    events_by_type: TopCounter = field(default_factory=lambda: TopCounter(16))
    visits_by_device: TopCounter = field(default_factory=lambda: TopCounter(32))
    dead_letters_by_reason: TopCounter = field(default_factory=lambda: TopCounter(64))
    lags_s: list[float] = field(default_factory=list)
    """Recent ingestion lags (receive time minus the visit's last event time), newest last."""

    def add(self, tables: dict[str, list[tuple[Any, ...]]], now_us: int) -> None:
        events = tables["events"]
        if events:
            self._add_events(events, now_us)
        visits = tables["visits"]
        if visits:
            self.visits_by_device.add_all([row[_DEVICE] for row in visits])
            lags = [(row[_VISIT_INGESTED] - row[_VISIT_END]) / 1e6 for row in visits if row[_VISIT_END] is not None]
            self.lags_s = (self.lags_s + lags)[-2000:]
        dead = tables["dead_letter"]
        if dead:
            self.dead_letters_by_reason.add_all([row[_REASON] for row in dead])

    def _add_events(self, events: list[tuple[Any, ...]], now_us: int) -> None:
        self.events_by_type.add_all([row[_EVENT_TYPE] for row in events])
        horizon = now_us + self.max_future_us
        newest = max((ts for row in events if (ts := row[_EVENT_TS]) <= horizon), default=None)
        if newest is not None and (self.max_event_us is None or newest > self.max_event_us):
            self.max_event_us = newest
            self.watermark_us = newest - self.allowed_lateness_us
        oldest_kept = self._oldest_open_start()
        minutes = self.minutes
        for row in events:
            event_type, ts = row[_EVENT_TYPE], row[_EVENT_TS]
            if event_type != "page_view" and event_type != "purchase":
                continue
            if ts > horizon:
                self.future_events += 1
                continue
            start = ts - ts % MINUTE_US
            if start < oldest_kept:
                self.late_events += 1
                continue
            window = minutes.get(start)
            if window is None:
                window = minutes[start] = Minute(start, pages=TopCounter(self.max_pages))
            if event_type == "page_view":
                window.page_views += 1
                window.pages.count(row[_PAGE_URL])
            else:
                window.purchases += 1
                window.revenue += row[_AMOUNT] or 0.0
        self._drop_old()

    def _oldest_open_start(self) -> int:
        """Events before this start time are late: their window closed (or was dropped)."""
        if self.watermark_us is None:
            return -(2**63)
        wm = self.watermark_us
        closed_before = wm - wm % MINUTE_US  # the window holding the watermark is still open
        assert self.max_event_us is not None
        kept_from = self.max_event_us - self.max_event_us % MINUTE_US - (self.keep_minutes - 1) * MINUTE_US
        return max(closed_before, kept_from)

    def _drop_old(self) -> None:
        if self.max_event_us is None or len(self.minutes) <= self.keep_minutes:
            return
        for start in sorted(self.minutes)[: len(self.minutes) - self.keep_minutes]:
            del self.minutes[start]

    def closed(self, start_us: int) -> bool:
        return self.watermark_us is not None and start_us + MINUTE_US <= self.watermark_us

    def series(self) -> list[Minute]:
        """Every kept minute, oldest first, with the empty minutes between filled in."""
        if not self.minutes:
            return []
        first, last = min(self.minutes), max(self.minutes)
        return [self.minutes.get(s) or Minute(s) for s in range(first, last + MINUTE_US, MINUTE_US)]

    def top_pages(self, last_minutes: int, n: int) -> list[tuple[str, int]]:
        """Page views by page over the newest ``last_minutes`` windows."""
        if not self.minutes:
            return []
        newest = max(self.minutes)
        total: Counter[str] = Counter()
        for start, window in self.minutes.items():
            if start > newest - last_minutes * MINUTE_US:
                total.update(window.pages)
        return total.most_common(n)

    def lag_quantiles(self) -> dict[str, float | None]:
        if not self.lags_s:
            return {"p50": None, "p99": None}
        ordered = sorted(self.lags_s)
        return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]}
