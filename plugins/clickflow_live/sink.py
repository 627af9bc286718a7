"""The ``live`` sink itself: it counts each parsed batch into the aggregates and serves them."""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Annotated

import anyio
import msgspec
from msgspec import Meta

from clickflow.api import Handler, RowBatch, Sink, SinkContext
from clickflow.options import BatchLimits, ByteSize, Duration, SinkOptions
from clickflow.schema import TABLE_NAMES
from clickflow_live.alerts import AlertRule, Alerts, Transition
from clickflow_live.webhook import Webhook, WebhookOptions
from clickflow_live.windows import LiveAggregates

DASHBOARD_PATH, API_PATH, STATIC_PREFIX = "/dashboard", "/api/live", "/static/clickflow"
WEBHOOK_DRAIN_SECONDS = 10.0


class LiveSinkOptions(SinkOptions, kw_only=True):
    allowed_lateness: Duration = Duration(minutes=5)
    """How far behind the newest event time an event may arrive and still count in its minute."""
    keep_minutes: Annotated[int, Meta(ge=2, le=1440)] = 60
    """One-minute windows kept (and charted)."""
    recent: Duration = Duration(minutes=5)
    """The sliding window of "clicks by page"."""
    top_pages: Annotated[int, Meta(ge=1, le=100)] = 15
    """Pages charted and exported; the rest are ``other``."""
    max_pages: Annotated[int, Meta(ge=10, le=100_000)] = 1000
    """Distinct pages counted per minute; past it, new pages count as ``other``."""
    max_future: Duration = Duration(minutes=5)
    """Events this far ahead of the clock are counted apart, never windowed."""
    alerts: list[AlertRule] = msgspec.field(default_factory=list)
    webhook: WebhookOptions | None = None
    refresh: Duration = Duration(seconds=1)
    """How often the dashboard polls ``/api/live``."""
    remember_visits: Annotated[int, Meta(ge=0, le=10_000_000)] = 100_000
    """Message keys kept (the last this many to twice as many, about 120 bytes each) so that a
    message delivered again, as Pub/Sub does when its batch was not acknowledged in time, counts
    once; 0 keeps none."""
    batch: BatchLimits = BatchLimits(max_rows=50_000, max_bytes=ByteSize(64 << 20), max_age=Duration(milliseconds=250))

    def __post_init__(self) -> None:
        """What would silently not work: alerts sharing a name (one metric series for two), a
        spike alert that the windows kept can never give a baseline, "recent" past those windows."""
        twice = sorted(name for name, n in Counter(rule.name for rule in self.alerts).items() if n > 1)
        if twice:
            raise ValueError(f"alerts: each needs a name of its own; {', '.join(twice)} is given twice")
        open_minutes = int(self.allowed_lateness / timedelta(minutes=1))  # not closed yet: not a baseline
        for rule in self.alerts:
            needed = rule.warmup_minutes + rule.min_baseline + open_minutes + 1
            if rule.kind == "spike" and self.keep_minutes < needed:
                raise ValueError(
                    f"alert {rule.name} could never fire: a spike needs {needed} minutes kept (warmup_minutes "
                    f"{rule.warmup_minutes}, min_baseline {rule.min_baseline}, {open_minutes} still open within "
                    f"allowed_lateness, and the newest), keep_minutes is {self.keep_minutes}"
                )
        if self.recent > timedelta(minutes=self.keep_minutes):
            raise ValueError(
                f"recent ({self.recent.total_seconds():g}s) is longer than the keep_minutes ({self.keep_minutes}) kept"
            )

    def http_paths(self) -> list[str]:
        return [DASHBOARD_PATH, API_PATH, f"{STATIC_PREFIX}/"]

    def exclusive_resources(self) -> list[str]:
        return ["the live dashboard and its metrics"]


class RecentKeys:
    """The last ``capacity`` to ``2 * capacity`` keys added, in two generations: the older one is
    dropped whole when the newer one fills, so memory stays bounded with no per-key bookkeeping."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._newer: set[str] = set()
        self._older: set[str] = set()

    def known(self, keys: list[str]) -> set[str]:
        """Those of ``keys`` added before (usually none, found by two C-level passes)."""
        if self._newer.isdisjoint(keys) and self._older.isdisjoint(keys):
            return set()
        return {key for key in keys if key in self._newer or key in self._older}

    def add(self, keys: list[str]) -> None:
        self._newer.update(keys)
        if len(self._newer) >= self.capacity:
            self._older, self._newer = self._newer, set()


class LiveBatch:
    """A live sink's batch: counts, not rows; each parsed batch is aggregated as it is added."""

    def __init__(self, sink: LiveSink) -> None:
        self._sink = sink
        self._counts = dict.fromkeys(TABLE_NAMES, 0)

    def add(self, rows: RowBatch) -> None:
        self._sink.count(rows)
        for name, table_rows in rows.tables.items():
            self._counts[name] += len(table_rows)

    def __len__(self) -> int:
        return sum(self._counts.values())

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def discard(self) -> None:
        pass


class LiveSink(Sink[LiveSinkOptions, LiveBatch]):
    """Live aggregates, a dashboard at /dashboard and traffic alerts; stores nothing."""

    type_name = "live"

    def __init__(self, name: str, options: LiveSinkOptions) -> None:
        super().__init__(name, options)
        minute = 60_000_000
        self.aggregates = LiveAggregates(
            allowed_lateness_us=int(options.allowed_lateness.total_seconds() * 1e6),
            keep_minutes=options.keep_minutes,
            max_pages=options.max_pages,
            max_future_us=int(options.max_future.total_seconds() * 1e6),
        )
        self.recent_minutes = max(1, round(options.recent.total_seconds() * 1e6 / minute))
        self.alerts = Alerts(options.alerts)
        self.fired: dict[str, int] = {rule.name: 0 for rule in options.alerts}
        self.transitions: deque[Transition] = deque(maxlen=50)
        self.webhook = Webhook(options.webhook) if options.webhook else None
        self.totals = {"messages": 0, "events": 0, "redelivered": 0}
        self.recent_keys = RecentKeys(options.remember_visits) if options.remember_visits else None
        self._rates: deque[tuple[float, int, int]] = deque()

    def routes(self) -> list[tuple[str, str, Handler]]:
        from clickflow_live import api

        return api.routes(self)

    @asynccontextmanager
    async def lifespan(self, context: SinkContext) -> AsyncIterator[None]:
        from clickflow_live.metrics import LiveCollector

        context.registry.register(LiveCollector(self))
        async with anyio.create_task_group() as tasks:
            if self.webhook is not None:
                tasks.start_soon(self.webhook.run)
            yield
            if self.webhook is not None:  # the last alerts still go out, within a bound
                self.webhook.finish()
                with anyio.move_on_after(WEBHOOK_DRAIN_SECONDS, shield=True):
                    await self.webhook.done.wait()
            tasks.cancel_scope.cancel()

    def new_batch(self) -> LiveBatch:
        return LiveBatch(self)

    def count(self, rows: RowBatch) -> None:
        """Take a parsed batch into the aggregates as it arrives (rows are not kept), but the
        messages it counted before."""
        keys = rows.message_keys()
        if self.recent_keys is not None:
            again = self.recent_keys.known(keys)
            self.recent_keys.add(keys)
            if again:
                rows, keys = rows.without_messages(again), [key for key in keys if key not in again]
                self.totals["redelivered"] += len(again)
        self.aggregates.add(rows.tables, time.time_ns() // 1000)
        self.totals["messages"] += len(keys)
        self.totals["events"] += len(rows.tables["events"])

    async def write(self, batch: LiveBatch) -> None:
        """Judge the alerts on what the batch added; nothing to store."""
        now = time.time()
        self._rates.append((now, self.totals["messages"], self.totals["events"]))
        while self._rates and self._rates[0][0] < now - 10:
            self._rates.popleft()
        for change in self.alerts.evaluate(self.aggregates):
            self.transitions.append(change)
            if change.state == "firing":
                self.fired[change.alert] += 1
            if self.webhook is not None:
                self.webhook.post(change)

    def rates(self) -> tuple[float, float]:
        """Messages and events per second over the last ten seconds (by arrival)."""
        if len(self._rates) < 2:
            return 0.0, 0.0
        (t0, m0, e0), (t1, m1, e1) = self._rates[0], self._rates[-1]
        span = max(t1 - t0, 1e-9)
        return (m1 - m0) / span, (e1 - e0) / span
