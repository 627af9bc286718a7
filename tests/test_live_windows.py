"""Event-time windows, traffic alerts and redeliveries in the live view, on hand-made rows and simulated
traffic."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from clickflow.api import Message
from clickflow.options import OptionsError, validate_options
from clickflow.parser import VisitParser
from clickflow.schema import EVENTS, VISITS, EventCol, VisitCol
from clickflow_live.alerts import AlertRule, Alerts
from clickflow_live.api import snapshot
from clickflow_live.sink import LiveSink, LiveSinkOptions, RecentKeys
from clickflow_live.windows import KEY_CHARS, MINUTE_US, OTHER, LiveAggregates
from clickflow_simulator.generator import Spike, VisitGenerator

T0 = int(datetime(2024, 7, 1, 9, 0, tzinfo=UTC).timestamp() * 1e6)
FAR_FUTURE = 2**62


def page_view(ts_us: int, page: str = "https://e.com/a") -> tuple[object, ...]:
    row: list[object] = [None] * len(EVENTS.columns)
    row[EventCol.event_type], row[EventCol.event_timestamp] = "page_view", ts_us
    row[EventCol.page_url] = page
    return tuple(row)


def as_parsed(events: list[tuple[object, ...]]) -> dict[str, list[tuple[object, ...]]]:
    """Tables as the parser gives them: each event with its visit (here one visit per event)."""
    visits = []
    for event in events:
        visit: list[object] = [None] * len(VISITS.columns)
        ts = event[EventCol.event_timestamp]
        visit[VisitCol.visit_start] = visit[VisitCol.visit_end] = ts
        visit[VisitCol.ingested_at] = ts
        visits.append(tuple(visit))
    return {"events": events, "visits": visits, "dead_letter": [], "purchase_items": []}


def feed(aggregates: LiveAggregates, *times_s: float, now_us: int = FAR_FUTURE) -> None:
    aggregates.add(as_parsed([page_view(T0 + int(t * 1e6)) for t in times_s]), now_us)


def counts(aggregates: LiveAggregates) -> dict[int, int]:
    return {(m.start_us - T0) // MINUTE_US: m.page_views for m in aggregates.series()}


def test_page_views_fall_in_the_minute_of_their_event_time_in_any_order() -> None:
    aggregates = LiveAggregates(allowed_lateness_us=120 * 10**6)
    feed(aggregates, 130, 5, 61, 59, 0, 125)
    assert counts(aggregates) == {0: 3, 1: 1, 2: 2}
    assert aggregates.late_events == 0


def test_windows_close_when_the_watermark_passes_and_later_events_are_late() -> None:
    aggregates = LiveAggregates(allowed_lateness_us=30 * 10**6)
    feed(aggregates, 10, 70)
    assert not aggregates.closed(T0)  # watermark 40 s: minute 0 still open
    feed(aggregates, 95)  # watermark 65 s: minute 0 closed
    assert aggregates.closed(T0) and not aggregates.closed(T0 + MINUTE_US)
    feed(aggregates, 20, 45)  # both for the closed minute
    assert counts(aggregates) == {0: 1, 1: 2}
    assert aggregates.late_events == 2


def test_an_event_far_in_the_past_is_late_and_one_far_in_the_future_is_set_apart() -> None:
    aggregates = LiveAggregates(allowed_lateness_us=60 * 10**6)
    feed(aggregates, 600, now_us=T0 + 700 * 10**6)
    feed(aggregates, -86_400 * 365, 10**9, now_us=T0 + 700 * 10**6)  # a year ago; decades ahead
    assert counts(aggregates) == {10: 1}
    assert (aggregates.late_events, aggregates.future_events) == (1, 1)
    assert aggregates.watermark_us == T0 + 540 * 10**6  # the future event did not move it


def test_only_the_newest_windows_are_kept() -> None:
    aggregates = LiveAggregates(keep_minutes=5, allowed_lateness_us=10**12)
    for minute in range(20):
        feed(aggregates, minute * 60)
    assert sorted(counts(aggregates)) == [15, 16, 17, 18, 19]
    assert aggregates.late_events == 0
    feed(aggregates, 60)  # for a dropped minute: late
    assert aggregates.late_events == 1


def test_a_window_far_behind_the_newest_is_dropped_so_the_series_stays_an_hour() -> None:
    """A device whose clock is years behind opened a window then, and every minute between it and
    now was filled in by each scrape and each alert check: millions of minutes, gigabytes."""
    aggregates = LiveAggregates(keep_minutes=60, allowed_lateness_us=3600 * 10**6)
    feed(aggregates, -10 * 365 * 86400)  # the first visit, ten years back
    feed(aggregates, 0, 30, 90)
    assert counts(aggregates) == {0: 2, 1: 1}
    feed(aggregates, -10 * 365 * 86400 + 60)  # behind the hour kept: late
    assert aggregates.late_events == 1
    feed(aggregates, 3600 * 5 - 600, 3600 * 5)
    assert list(counts(aggregates)) == list(range(290, 301))  # within the newest hour, gaps filled in


def test_a_flood_of_unique_pages_is_capped_with_an_other_bucket() -> None:
    aggregates = LiveAggregates(max_pages=100)
    rows = [page_view(T0 + i, f"https://e.com/{i}") for i in range(100_000)]
    aggregates.add(as_parsed(rows), FAR_FUTURE)
    (minute,) = aggregates.series()
    assert len(minute.pages) == 101 and minute.pages[OTHER] == 100_000 - 100
    assert sum(minute.pages.values()) == minute.page_views == 100_000
    top = aggregates.top_pages(5, 10)
    assert top[0] == (OTHER, 99_900) and len(top) == 10


def test_huge_page_urls_and_device_names_are_counted_under_a_cut_key() -> None:
    """What a client sends is kept by the live view for an hour: a megabyte URL must not be."""
    aggregates = LiveAggregates()
    long_prefix = "https://e.com/" + "a" * 1_000_000
    rows = [page_view(T0 + i, f"{long_prefix}{i}") for i in range(50)] + [page_view(T0, "https://e.com/b")]
    tables = as_parsed(rows)
    tables["visits"] = [
        tuple((*v[: VisitCol.device_type], "d" * 10**6, *v[VisitCol.device_type + 1 :])) for v in tables["visits"]
    ]
    aggregates.add(tables, FAR_FUTURE)
    (minute,) = aggregates.series()
    cut = long_prefix[: KEY_CHARS - 1] + "…"
    assert dict(minute.pages) == {cut: 50, "https://e.com/b": 1}
    assert aggregates.visits_by_device == {"d" * (KEY_CHARS - 1) + "…": 51}
    assert aggregates.top_pages(5, 10) == [(cut, 50), ("https://e.com/b", 1)]


def simulated(seed: int, minutes: int, spike: Spike | None = None) -> list[list[Message]]:
    """Visits at 1,000 a minute on a virtual clock, in batches of 500."""
    generator = VisitGenerator(seed=seed, start=datetime(2024, 7, 1, tzinfo=UTC), visits_per_minute=1000, spike=spike)
    total = minutes * 1000 + (int(spike.duration_s / 60 * 1000 * (spike.factor - 1)) if spike else 0)
    messages = [Message(generator.message(i), f"{seed}:{i}") for i in range(total)]
    return [messages[i : i + 500] for i in range(0, len(messages), 500)]


def run_alerts(batches: list[list[Message]], rules: list[AlertRule]) -> list[tuple[str, str]]:
    aggregates, alerts, parser = LiveAggregates(allowed_lateness_us=4 * MINUTE_US), Alerts(rules), VisitParser()
    changes = []
    for batch in batches:
        aggregates.add(parser.parse(batch, "sim", 0).tables, FAR_FUTURE)
        changes += [(c.alert, c.state) for c in alerts.evaluate(aggregates)]
    return changes


SPIKE_RULE = AlertRule(name="spike", kind="spike", ratio=3, min_page_views=500, clear_after=2)


def test_the_spike_rule_fires_on_a_simulated_attack_and_clears_after_it() -> None:
    attack = Spike(at_s=12 * 60, factor=20, duration_s=120)
    changes = run_alerts(simulated(1, 24, attack), [SPIKE_RULE])
    assert changes == [("spike", "firing"), ("spike", "cleared")]


@pytest.mark.parametrize("seed", range(8))
def test_the_spike_rule_stays_quiet_on_normal_traffic(seed: int) -> None:
    """Eight seeds of 20 minutes each of ordinary traffic: the false-positive rate measured is 0 of 8."""
    assert run_alerts(simulated(seed, 20), [SPIKE_RULE]) == []


def test_a_quiet_site_does_not_alert_on_noise() -> None:
    rule = AlertRule(name="spike", kind="spike", ratio=3, min_page_views=10**6)
    attack = Spike(at_s=12 * 60, factor=20, duration_s=120)
    assert run_alerts(simulated(1, 20, attack), [rule]) == []


def test_the_threshold_rule_fires_as_soon_as_the_open_minute_crosses_it() -> None:
    rule = AlertRule(name="ceiling", kind="threshold", above=50, clear_after=1)
    aggregates, alerts = LiveAggregates(allowed_lateness_us=10 * 10**6), Alerts([rule])
    feed(aggregates, *range(0, 40))
    assert alerts.evaluate(aggregates) == []
    feed(aggregates, *[40 + i / 10 for i in range(20)])  # 60 in minute 0, which is still open
    (fired,) = alerts.evaluate(aggregates)
    assert (fired.state, fired.value, fired.threshold) == ("firing", 60, 50.0)
    feed(aggregates, 65, 130)  # minute 1 closes with 1 page view: quiet
    (cleared,) = alerts.evaluate(aggregates)
    assert cleared.state == "cleared"


def test_a_firing_alerts_value_is_its_busiest_minute_with_that_minute() -> None:
    """The value and the minute the API and the dashboard show are one minute's: they once paired
    the busiest minute's page views with the newest minute over the threshold."""
    rule = AlertRule(name="ceiling", kind="threshold", above=50, clear_after=1)
    aggregates, alerts = LiveAggregates(allowed_lateness_us=10 * 10**6), Alerts([rule])
    feed(aggregates, *[i / 2 for i in range(100)])  # 100 page views in minute 0
    assert [c.state for c in alerts.evaluate(aggregates)] == ["firing"]
    feed(aggregates, *[60 + i for i in range(55)])  # 55 in minute 1: over the threshold, not the busiest
    assert alerts.evaluate(aggregates) == []
    (state,) = alerts.states
    assert (state.firing, state.value, state.minute_us) == (True, 100, T0)
    feed(aggregates, *[120 + i / 5 for i in range(200)])  # 200 in minute 2: the busiest now
    alerts.evaluate(aggregates)
    assert (state.value, state.minute_us) == (200, T0 + 2 * MINUTE_US)


def test_a_threshold_rule_needs_its_threshold() -> None:
    with pytest.raises(ValueError, match="needs above"):
        AlertRule(name="x", kind="threshold")


def spike_fires(keep_minutes: int, lateness_s: int, rule: AlertRule) -> bool:
    """Forty minutes of 100 page views a minute, then three of 2,000, judged as they arrive."""
    aggregates, alerts = (
        LiveAggregates(allowed_lateness_us=lateness_s * 10**6, keep_minutes=keep_minutes),
        Alerts([rule]),
    )
    states = []
    for minute in range(50):
        n = 2000 if 40 <= minute < 43 else 100
        feed(aggregates, *[minute * 60 + i * 60 / n for i in range(n)])
        states += [change.state for change in alerts.evaluate(aggregates)]
    return "firing" in states


@pytest.mark.parametrize(("lateness_s", "warmup", "min_baseline"), [(0, 3, 3), (300, 3, 3), (90, 0, 5), (270, 2, 4)])
def test_a_spike_alert_is_refused_exactly_when_the_windows_kept_could_never_fire_it(
    lateness_s: int, warmup: int, min_baseline: int
) -> None:
    """Validation's bound against the aggregates': the fewest windows kept with which the spike fires."""
    rule = {
        "name": "spike",
        "kind": "spike",
        "warmup_minutes": warmup,
        "min_baseline": min_baseline,
        "min_page_views": 10,
    }
    fewest = next(keep for keep in range(2, 30) if spike_fires(keep, lateness_s, AlertRule(**rule)))
    options = {"allowed_lateness": lateness_s, "alerts": [rule]}
    assert validate_options(LiveSinkOptions, {**options, "keep_minutes": fewest}).keep_minutes == fewest
    with pytest.raises(OptionsError, match=rf"alert spike could never fire: a spike needs {fewest} minutes kept"):
        validate_options(LiveSinkOptions, {**options, "keep_minutes": fewest - 1})


def test_alerts_that_share_a_name_or_a_recent_past_the_windows_kept_are_refused() -> None:
    twice = [{"name": "a", "kind": "threshold", "above": 5}, {"name": "a", "kind": "threshold", "above": 6}]
    with pytest.raises(OptionsError, match="alerts: each needs a name of its own; a is given twice"):
        validate_options(LiveSinkOptions, {"alerts": twice})
    with pytest.raises(OptionsError, match=r"recent \(1800s\) is longer than the keep_minutes \(10\) kept"):
        validate_options(LiveSinkOptions, {"keep_minutes": 10, "recent": "30m"})


def live_counts(sink: LiveSink) -> dict[str, object]:
    """What the live view shows of its counts, less what depends on the clock."""
    shown = snapshot(sink)
    keys = ("page_views_per_minute", "purchases_per_minute", "events_by_type", "visits_by_device",
            "dead_letters_by_reason", "totals")  # fmt: skip
    return {key: shown[key] for key in keys}


def test_a_message_delivered_again_is_counted_once() -> None:
    first, second = simulated(seed=5, minutes=1)  # two batches of 500 visits
    garbage = Message(b"not json", "g1")  # dead-lettered whole
    once, again, parser = LiveSink("live", LiveSinkOptions()), LiveSink("live", LiveSinkOptions()), VisitParser()
    for batch in ([*first, garbage], second):
        once.count(parser.parse(batch, "sim", T0))
    for batch in ([*first, garbage], [*second, garbage], first, second[:100]):  # "g1" again, a batch, part of one
        again.count(parser.parse(batch, "sim", T0))
    counted_once = live_counts(once)
    assert counted_once["totals"] == {"messages": 1001, "events": once.totals["events"], "redelivered": 0}
    assert live_counts(again) == counted_once | {"totals": {**once.totals, "redelivered": 1 + 500 + 100}}


def test_remember_visits_0_counts_every_delivery() -> None:
    sink, rows = LiveSink("live", LiveSinkOptions(remember_visits=0)), VisitParser().parse(simulated(5, 1)[0], "s", T0)
    sink.count(rows)
    sink.count(rows)
    assert sink.totals["messages"] == 1000 and sink.totals["redelivered"] == 0


def test_recent_keys_remember_the_last_capacity_to_twice_capacity_keys() -> None:
    recent = RecentKeys(capacity=2)
    recent.add(["a", "b"])  # full: becomes the older generation
    recent.add(["c"])
    assert recent.known(["a", "b", "c", "d"]) == {"a", "b", "c"}
    recent.add(["d"])  # full again: "a" and "b" are dropped with the oldest generation
    assert recent.known(["a", "b", "c", "d"]) == {"c", "d"}
