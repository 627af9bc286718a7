"""Event-time aggregates of the rows the parser produced, in bounded memory.

Page views, purchases and revenue are counted in tumbling one-minute windows of
``event_timestamp``. The watermark is the latest event time seen minus the allowed
lateness; a window whose end is behind the watermark is *closed* (complete) and
an event for a window already closed or dropped is counted as late instead. Events
more than ``max_future`` ahead of the wall clock (in a later minute) are counted apart, so one bogus
timestamp cannot move the watermark and close every window. Only the windows of the
newest ``keep_minutes`` minutes, up to the newest event's, are kept.

Every labelled count is capped (``TopCounter``): past ``cap`` distinct keys, new
keys go to ``other``, and a key is cut to ``KEY_CHARS``, so a flood of unique or huge
page URLs or device names costs neither memory nor metric labels.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import compress, repeat
from operator import floordiv, itemgetter
from typing import Any

from clickflow.schema import DeadLetterCol, EventCol, VisitCol

MINUTE_US = 60_000_000
OTHER = "other"
KEY_CHARS = 512
"""The longest key counted; a longer one (a page URL a client made huge) is cut, marked with "…"."""
LAGS_KEPT = 2000

_EVENT_TS, _AMOUNT = EventCol.event_timestamp, EventCol.amount
_VISIT_END, _VISIT_INGESTED = VisitCol.visit_end, VisitCol.ingested_at
_get_type, _get_ts = itemgetter(EventCol.event_type), itemgetter(EventCol.event_timestamp)
_get_page, _get_amount = itemgetter(EventCol.page_url), itemgetter(EventCol.amount)
_get_visit_end, _get_device = itemgetter(VisitCol.visit_end), itemgetter(VisitCol.device_type)
_get_reason = itemgetter(DeadLetterCol.reason)


def minute_text(start_us: int) -> str:
    """A window's start as RFC 3339 text, as the JSON endpoint and the webhook give it."""
    return datetime.fromtimestamp(start_us // 1_000_000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class TopCounter(Counter[str]):
    """A Counter of at most ``cap`` keys plus ``other``."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap = cap

    def count(self, key: str | None, n: int = 1) -> None:
        if key is None:
            key = "(none)"
        elif len(key) > KEY_CHARS:
            key = key[: KEY_CHARS - 1] + "…"
        if key in self or len(self) < self.cap:
            self[key] += n
        else:
            self[OTHER] += n

    def add_all(self, keys: Iterable[str | None]) -> None:
        """Count many keys at once: one C pass, then one step per distinct key."""
        for key, n in Counter(keys).items():
            self.count(key, n)


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
        """Count one parsed batch: the parser's tables, in which every event's visit row is too."""
        events, visits = tables["events"], tables["visits"]
        if events:
            self._add_events(events, visits, now_us)
        if visits:
            self.visits_by_device.add_all(map(_get_device, visits))
            recent = visits[-LAGS_KEPT:]
            lags = [(row[_VISIT_INGESTED] - row[_VISIT_END]) / 1e6 for row in recent if row[_VISIT_END] is not None]
            self.lags_s = (self.lags_s + lags)[-LAGS_KEPT:]
        dead = tables["dead_letter"]
        if dead:
            self.dead_letters_by_reason.add_all(map(_get_reason, dead))

    def _add_events(self, events: list[tuple[Any, ...]], visits: list[tuple[Any, ...]], now_us: int) -> None:
        """One C-level pass counts (event type, minute, page) triples and one finds the purchases
        with an amount; the rest runs once per distinct triple or purchase, so no Python code runs
        per event (``bench/bench_live.py`` measures it)."""
        horizon = now_us + self.max_future_us
        # the newest event is the newest visit end: one value per visit rather than per event
        newest = max((end for end in map(_get_visit_end, visits) if end is not None), default=None)
        if newest is not None and newest > horizon:
            newest = max((ts for ts in map(_get_ts, events) if ts <= horizon), default=None)
        if newest is not None and (self.max_event_us is None or newest > self.max_event_us):
            self.max_event_us = newest
            self.watermark_us = newest - self.allowed_lateness_us
        first_open = self._oldest_open_start() // MINUTE_US
        last_allowed = horizon // MINUTE_US
        minutes = map(floordiv, map(_get_ts, events), repeat(MINUTE_US))
        triples = Counter(zip(map(_get_type, events), minutes, map(_get_page, events), strict=True))
        for (event_type, minute, page), n in triples.items():
            self.events_by_type.count(event_type, n)
            if event_type == "page_view":
                window = self._window(minute, n, first_open, last_allowed)
                if window is not None:
                    window.page_views += n
                    window.pages.count(page, n)
            elif event_type == "purchase":
                window = self._window(minute, n, first_open, last_allowed)
                if window is not None:
                    window.purchases += n
        for row in compress(events, map(_get_amount, events)):  # only a purchase has an amount
            window = self._window(row[_EVENT_TS] // MINUTE_US, 0, first_open, last_allowed)
            if window is not None:
                window.revenue += row[_AMOUNT]
        self._drop_old()

    def _window(self, minute: int, n: int, first_open: int, last_allowed: int) -> Minute | None:
        """The window of this minute, or None (counting the ``n`` events late or future)."""
        if minute > last_allowed:
            self.future_events += n
            return None
        if minute < first_open:
            self.late_events += n
            return None
        window = self.minutes.get(minute * MINUTE_US)
        if window is None:
            window = self.minutes[minute * MINUTE_US] = Minute(minute * MINUTE_US, pages=TopCounter(self.max_pages))
        return window

    def _oldest_open_start(self) -> int:
        """Events before this start time are late: their window closed (or was dropped)."""
        if self.watermark_us is None:
            return -(2**63)
        wm = self.watermark_us
        closed_before = wm - wm % MINUTE_US  # the window holding the watermark is still open
        return max(closed_before, self._kept_from())

    def _kept_from(self) -> int:
        """The start of the oldest of the ``keep_minutes`` minutes up to the newest event's."""
        assert self.max_event_us is not None
        return self.max_event_us - self.max_event_us % MINUTE_US - (self.keep_minutes - 1) * MINUTE_US

    def _drop_old(self) -> None:
        """Windows older than the newest ``keep_minutes`` minutes, however few: one a device with a
        wrong clock opened years back would make ``series`` fill in every minute since."""
        if self.max_event_us is None:
            return
        kept_from = self._kept_from()
        for start in [start for start in self.minutes if start < kept_from]:
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
        import statistics  # here, as in ``alerts``: not paid by `clickflow validate`

        ordered = sorted(self.lags_s)
        return {"p50": statistics.median(ordered), "p99": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]}
