"""The live aggregates on ``/metrics``, read at scrape time; every label set is bounded.

Counters (``_total``) add up across a fleet of workers; the per-minute gauges are each
worker's view of its own event-time windows, so ``sum()`` of them is the fleet's page
views in that minute (``deploy``-independent rules are in ``prometheus/``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from clickflow_live.sink import LiveSink


class LiveCollector(Collector):
    def __init__(self, sink: LiveSink) -> None:
        self.sink = sink

    def collect(self) -> Iterator[Metric]:
        sink, aggregates = self.sink, self.sink.aggregates
        series = aggregates.series()
        closed = [m for m in series if aggregates.closed(m.start_us)]
        still_open = [m for m in series if not aggregates.closed(m.start_us)]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, value=value)

        yield gauge("clickflow_live_page_views_last_minute", "Page views in the newest complete event-time minute",
                    closed[-1].page_views if closed else 0)  # fmt: skip
        yield gauge("clickflow_live_page_views_current_minute", "Page views so far in the newest open minute",
                    still_open[-1].page_views if still_open else 0)  # fmt: skip
        yield gauge("clickflow_live_revenue_last_minute", "Purchase amounts in the newest complete minute",
                    closed[-1].revenue if closed else 0)  # fmt: skip
        pages = GaugeMetricFamily("clickflow_live_page_views_recent", "Page views by page over the recent window "
                                  "(top pages, the rest as other)", labels=["page"])  # fmt: skip
        for page, count in aggregates.top_pages(sink.recent_minutes, sink.options.top_pages):
            pages.add_metric([page], count)
        yield pages
        for name, doc, label, counts in (
            ("clickflow_live_events", "Events seen by the live view", "event_type", aggregates.events_by_type),
            ("clickflow_live_visits", "Visits seen by the live view", "device_type", aggregates.visits_by_device),
        ):
            family = CounterMetricFamily(name, doc, labels=[label])
            for key, count in counts.items():
                family.add_metric([key], count)
            yield family
        yield CounterMetricFamily("clickflow_live_redelivered_messages", "Messages delivered again, counted once "
                                  "(within remember_visits)", value=sink.totals["redelivered"])  # fmt: skip
        outside = CounterMetricFamily("clickflow_live_unwindowed_events", "Events outside the windows", labels=["why"])
        outside.add_metric(["late"], aggregates.late_events)
        outside.add_metric(["future"], aggregates.future_events)
        yield outside
        lag = GaugeMetricFamily("clickflow_live_ingestion_lag_seconds", "Receive time minus a visit's last event "
                                "time, over recent visits", labels=["quantile"])  # fmt: skip
        for quantile, value in aggregates.lag_quantiles().items():
            if value is not None:
                lag.add_metric([{"p50": "0.5", "p99": "0.99"}[quantile]], value)
        yield lag
        firing = GaugeMetricFamily("clickflow_alert_firing", "1 while the alert fires", labels=["alert"])
        fired = CounterMetricFamily("clickflow_alerts_fired", "Times each alert started firing", labels=["alert"])
        for state in sink.alerts.states:
            firing.add_metric([state.rule.name], 1.0 if state.firing else 0.0)
            fired.add_metric([state.rule.name], sink.fired[state.rule.name])
        yield firing
        yield fired
        if sink.webhook is not None:
            posts = CounterMetricFamily("clickflow_alert_webhook_posts", "Alert webhook posts", labels=["outcome"])
            for outcome in ("delivered", "failed", "dropped"):
                posts.add_metric([outcome], getattr(sink.webhook, outcome))
            yield posts
