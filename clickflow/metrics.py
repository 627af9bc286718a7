"""Prometheus metrics of one pipeline, in a registry of its own (so tests can run several)."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # prometheus_client is imported when a pipeline runs, not when plugins load
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics import MetricWrapperBase

M = TypeVar("M", bound="MetricWrapperBase")
_SHARED: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, MetricWrapperBase]] = weakref.WeakKeyDictionary()


def shared_metric(
    registry: CollectorRegistry, kind: type[M], name: str, documentation: str, labels: list[str], **extra: Any
) -> M:
    """The metric family ``name`` of this registry, created on first use.

    A plugin's instances share one family, labelled by component name: registering a
    family per instance fails (``Duplicated timeseries``) as soon as a pipeline has two.
    """
    families = _SHARED.setdefault(registry, {})
    if name not in families:
        families[name] = kind(name, documentation, labels, registry=registry, **extra)
    return families[name]  # type: ignore[return-value]


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.messages_received = Counter("clickflow_messages_received", "Raw messages received", ["source"], registry=r)
        self.events_parsed = Counter("clickflow_events_parsed", "Events accepted by the parser", ["source"], registry=r)
        self.dead_letters = Counter(
            "clickflow_dead_letters", "Rejected messages and events", ["source", "reason"], registry=r
        )
        self.repeated = Counter(
            "clickflow_messages_repeated",
            "Messages that came again in the batch they were in (parsed once)",
            ["source"],
            registry=r,
        )
        self.rows_written = Counter("clickflow_rows_written", "Rows durably written", ["sink", "table"], registry=r)
        self.stored_already = Counter(
            "clickflow_visits_stored_already",
            "Visits a sink found stored already, and did not store again (an input read again, a redelivery)",
            ["sink"],
            registry=r,
        )
        self.write_seconds = Histogram(
            "clickflow_batch_write_seconds",
            "Time to write one batch, retries included",
            ["sink"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.write_failures = Counter("clickflow_sink_write_failures", "Failed write attempts", ["sink"], registry=r)
        self.in_flight = Gauge("clickflow_messages_in_flight", "Messages received but not yet settled", registry=r)
        self.acknowledged = Counter(
            "clickflow_messages_acknowledged", "Messages settled", ["source", "outcome"], registry=r
        )
        self.heartbeat = Gauge(
            "clickflow_source_heartbeat_timestamp_seconds",
            "Last time each source's loop reported alive",
            ["source"],
            registry=r,
        )
