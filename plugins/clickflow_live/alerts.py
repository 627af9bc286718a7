"""Traffic alerts on page views per minute (a denial-of-service attack shows as a jump).

Two rules, each evaluated on every complete (closed) minute in order, and on the
minute still filling, which can only grow, so an attack fires before its minute ends:

- ``threshold``: page views in a minute above ``above``.
- ``spike``: above ``max(ratio * median, median + mad_k * 1.4826 * MAD)`` of the
  previous ``baseline_minutes`` closed minutes (median and MAD resist the outliers an
  attack adds), and at least ``min_page_views``, so a quiet site does not alert on noise.
  It needs ``min_baseline`` closed minutes of history first, after ``warmup_minutes``.

An alert clears after ``clear_after`` consecutive closed minutes at or below its
threshold, so it does not flap. Firing and clearing each give one log line, the
``clickflow_alert_firing`` gauge, and an optional webhook POST.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Annotated, Literal

from msgspec import Meta

from clickflow.options import OptionGroup, PositiveInt
from clickflow_live.windows import LiveAggregates, Minute, minute_text

log = logging.getLogger(__name__)


class AlertRule(OptionGroup, frozen=True, kw_only=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")]
    kind: Literal["threshold", "spike"]
    above: PositiveInt | None = None
    """``threshold``: page views per minute that fire the alert."""
    ratio: Annotated[float, Meta(gt=1.0)] = 3.0
    mad_k: Annotated[float, Meta(gt=0.0)] = 6.0
    baseline_minutes: Annotated[int, Meta(ge=3, le=1440)] = 30
    min_baseline: Annotated[int, Meta(ge=3)] = 3
    warmup_minutes: Annotated[int, Meta(ge=0)] = 3
    """Closed minutes at the start of a stream left out of the baseline: a visit arrives when it
    ends, with events minutes old, so the first minutes of a stream are always incomplete."""
    min_page_views: Annotated[int, Meta(ge=0)] = 100
    clear_after: PositiveInt = 2

    def __post_init__(self) -> None:
        if self.kind == "threshold" and self.above is None:
            raise ValueError(f"alert {self.name}: a threshold alert needs above: (page views per minute)")

    def threshold(self, history: list[int]) -> float | None:
        """The page views per minute above which this rule fires, given the closed minutes before."""
        if self.kind == "threshold":
            return float(self.above or 0)
        baseline = history[self.warmup_minutes :][-self.baseline_minutes :]
        if len(baseline) < self.min_baseline:
            return None
        import statistics  # here: 9 ms that `clickflow validate` need not pay

        median = statistics.median(baseline)
        mad = statistics.median(abs(x - median) for x in baseline)
        return max(self.ratio * median, median + self.mad_k * 1.4826 * mad, float(self.min_page_views))


@dataclass
class AlertState:
    rule: AlertRule
    firing: bool = False
    since: float | None = None
    value: int = 0
    """With ``minute_us``: the busiest minute judged since the alert last fired (its page views
    and start), kept after it clears; 0 and None before it ever fired."""
    threshold: float | None = None
    minute_us: int | None = None
    quiet_minutes: int = 0
    evaluated_until: int | None = None
    """Start of the newest closed minute already judged."""


@dataclass(frozen=True)
class Transition:
    """An alert that fired or cleared, as logged, counted and posted."""

    alert: str
    state: Literal["firing", "cleared"]
    value: int
    threshold: float
    minute: str
    at: float


class Alerts:
    def __init__(self, rules: list[AlertRule]) -> None:
        self.states = [AlertState(rule) for rule in rules]

    def evaluate(self, aggregates: LiveAggregates) -> list[Transition]:
        series = aggregates.series()
        closed = [m for m in series if aggregates.closed(m.start_us)]
        still_open = [m for m in series if not aggregates.closed(m.start_us)]
        history = [m.page_views for m in closed]
        changes: list[Transition] = []
        for state in self.states:
            for index, minute in enumerate(closed):
                if state.evaluated_until is not None and minute.start_us <= state.evaluated_until:
                    continue
                state.evaluated_until = minute.start_us
                changes += self._judge(state, minute, history[:index], closed_minute=True)
            for minute in still_open:
                changes += self._judge(state, minute, history, closed_minute=False)
        return changes

    def _judge(self, state: AlertState, minute: Minute, history: list[int], closed_minute: bool) -> list[Transition]:
        threshold = state.rule.threshold(history)
        if threshold is None:
            return []
        if not state.firing:
            state.threshold = threshold  # what the dashboard draws; kept as it was while firing
        over = minute.page_views > threshold
        if over and not state.firing:
            state.firing, state.since, state.quiet_minutes = True, time.time(), 0
            state.value, state.threshold, state.minute_us = minute.page_views, threshold, minute.start_us
            return [self._transition(state, "firing", minute, threshold)]
        if state.firing and over:
            state.quiet_minutes = 0
            if minute.page_views > state.value:
                state.value, state.minute_us = minute.page_views, minute.start_us
        elif state.firing and closed_minute:
            state.quiet_minutes += 1
            if state.quiet_minutes >= state.rule.clear_after:
                state.firing, state.since = False, None
                return [self._transition(state, "cleared", minute, threshold)]
        return []

    def _transition(
        self, state: AlertState, to: Literal["firing", "cleared"], minute: Minute, threshold: float
    ) -> Transition:
        change = Transition(
            state.rule.name, to, minute.page_views, round(threshold, 1), minute_text(minute.start_us), time.time()
        )
        log.warning("alert %s %s: %d page views in the minute from %s (threshold %.0f)",
                    change.alert, to, change.value, change.minute, threshold)  # fmt: skip
        return change
