"""The simulator: realistic, reproducible, bounded by count or duration, throttled on request."""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from clickflow.api import Message
from clickflow.config import Pipeline
from clickflow.parser import VisitParser
from clickflow.testing import run_pipeline
from clickflow_simulator import TICK_S, SimulatorOptions, VisitGenerator, simulated_messages
from tests.conftest import table_counts
from tests.emulators import clickflow
from tests.fakes import MemorySink

START = datetime(2024, 7, 1, 9, tzinfo=UTC)


def test_same_seed_same_output() -> None:
    first = list(VisitGenerator(seed=3, start=START).messages(50))
    again = list(VisitGenerator(seed=3, start=START).messages(50))
    other = list(VisitGenerator(seed=4, start=START).messages(50))
    assert first == again != other


def test_visits_look_like_the_real_data() -> None:
    visits = list(VisitGenerator(seed=1, start=START).visits(2000))
    devices = Counter(v["device_type"] for v in visits)
    types = Counter(e["event"]["event_type"] for v in visits for e in v["events"])
    assert set(devices) == {"desktop", "mobile", "tablet"} and devices["desktop"] > devices["tablet"]
    assert types["page_view"] > types["add_item_to_cart"] > types["purchase"] > 0
    for visit in visits:
        for event in visit["events"]:
            if event["event"]["event_type"] == "purchase":
                details = event["event"]["details"]
                total = sum(i["price"] * i["quantity"] for i in details["items"])
                assert abs(details["amount"] - total) < 0.01


def test_generated_visits_parse_cleanly() -> None:
    messages = [Message(data, str(i)) for i, data in enumerate(VisitGenerator(seed=2).messages(500))]
    assert VisitParser().parse(messages, "sim", 0).counts()["dead_letter"] == 0


def test_bare_format_matches_the_published_schema() -> None:
    visit = next(VisitGenerator(seed=1, event_format="bare").visits(1))
    assert "event_type" in visit["events"][0]


def test_malformed_rate_produces_dead_letters() -> None:
    messages = [Message(d, str(i)) for i, d in enumerate(VisitGenerator(seed=5, malformed_rate=0.2).messages(1000))]
    dead = VisitParser().parse(messages, "sim", 0).counts()["dead_letter"]
    assert 120 < dead < 280


def test_count_bounds_the_stream() -> None:
    batches = list(simulated_messages(SimulatorOptions(count=2500, batch_size=1000)))
    assert [len(b) for _, b in batches] == [1000, 1000, 500]


def test_throttled_stream_schedules_visits_at_the_rate() -> None:
    now = [100.0]
    options = SimulatorOptions(visits_per_minute=600, duration=timedelta(seconds=2))
    schedule = []
    for due, batch in simulated_messages(options, clock=lambda: now[0]):
        schedule.append((due, len(batch)))
        now[0] = max(now[0], due)  # a caller sleeps until each batch is due
    assert sum(n for _, n in schedule) == 20
    assert schedule[1][0] - schedule[0][0] == pytest.approx(0.1)


def test_a_throttled_batch_holds_the_visits_due_within_a_tick_of_its_first() -> None:
    now = [100.0]
    options = SimulatorOptions(visits_per_minute=9000, count=100)  # a visit every 6.7 ms
    schedule = []
    for due, batch in simulated_messages(options, clock=lambda: now[0]):
        schedule.append((due, len(batch)))
        now[0] = max(now[0], due)
    per_tick = math.ceil(TICK_S / (60 / 9000))
    assert per_tick > 1
    whole, rest = divmod(100, per_tick)
    assert [n for _, n in schedule] == [per_tick] * whole + ([rest] if rest else [])
    assert schedule[1][0] - schedule[0][0] == pytest.approx(per_tick * 60 / 9000)  # each when its first is due


def test_a_reader_behind_the_schedule_gets_every_visit_due_at_once() -> None:
    clock = iter([100.0, 101.0, 101.0, 101.0])  # started at 100, then read a second late
    options = SimulatorOptions(visits_per_minute=9000, count=1000)  # a visit every 6.7 ms
    batches = simulated_messages(options, clock=lambda: next(clock))
    due, first = next(batches)
    assert due == 100.0
    assert len(first) == math.ceil((1 + TICK_S) / (60 / 9000))  # due in the second behind, and a tick after
    assert len(next(batches)[1]) == math.ceil(TICK_S / (60 / 9000))  # caught up: a tick's worth


def test_simulator_pipeline_ingests_every_visit(pipeline: Callable[..., Pipeline], tmp_path: object) -> None:
    db = f"{tmp_path}/sim.duckdb"
    summary = run_pipeline(pipeline(f"sources: [{{type: simulator, count: 3000, seed: 9, malformed_rate: 0.05}}]\n"
                                    f"sinks: [{{type: duckdb, path: '{db}'}}]"))  # fmt: skip
    counts = table_counts(db)
    whole_message_dead = summary.dead_letters["invalid_json"] + summary.dead_letters["invalid_session_id"]
    assert counts["visits"] + whole_message_dead == 3000
    assert counts["dead_letter"] == sum(summary.dead_letters.values()) > 0


def test_a_seeded_run_at_another_time_is_stored_and_one_with_a_fixed_start_once(
    pipeline: Callable[..., Pipeline], tmp_path: object
) -> None:
    """The quickstart run twice into one file: its seeded visits are timed from now, so the second
    run's are other visits. With ids of seed and index alone, they were dropped as stored; with ids
    of index and content alone, so were the few whose bytes hold no time (a one-event visit whose
    timestamp is broken: its visit row, without events)."""
    db = f"{tmp_path}/sim.duckdb"
    now = (
        f"sources: [{{type: simulator, count: 200, seed: 9, malformed_rate: 1.0}}]\n"
        f"sinks: [{{type: duckdb, path: '{db}'}}]"
    )
    first = table_counts_after(pipeline(now), db)
    assert first["dead_letter"] > 20 and first["visits"] > 20
    time.sleep(1.01)  # the start is the second the run began
    assert table_counts_after(pipeline(now), db) == {table: 2 * count for table, count in first.items()}
    fixed = now.replace("seed: 9", "seed: 9, start: 2024-07-01T09:00:00Z")
    once = table_counts_after(pipeline(fixed), db)
    assert table_counts_after(pipeline(fixed), db) == once  # the same visits again
    assert once["visits"] == 3 * first["visits"]


def table_counts_after(pipeline: Pipeline, db: str) -> dict[str, int]:
    run_pipeline(pipeline)
    return table_counts(db)


def test_a_throttled_run_is_gathered_for_max_age_and_an_unthrottled_one_written_whenever_the_sink_is_free(
    fake_pipeline: Callable[[str], Pipeline],
) -> None:
    sink = "sinks: [{type: memory, batch: {max_age: 1h}}]"
    started = time.monotonic()
    run_pipeline(
        fake_pipeline(f"sources: [{{type: simulator, count: 200, visits_per_minute: 12000, seed: 1}}]\n{sink}")
    )
    assert time.monotonic() - started < 30  # not an hour: the end of the run writes what is gathered
    assert len(MemorySink.writes) == 1
    assert len(MemorySink.writes[0][1].tables["visits"]) + len(MemorySink.writes[0][1].tables["dead_letter"]) == 200
    MemorySink.writes.clear()
    run_pipeline(fake_pipeline(f"sources: [{{type: simulator, count: 3000, batch_size: 1000, seed: 1}}]\n{sink}"))
    assert len(MemorySink.writes) > 1  # the first batch was written while the others were parsed
    assert sum(len(batch.tables["visits"]) for _, batch in MemorySink.writes) == 3000


def test_simulate_command_prints_json_lines() -> None:
    result = clickflow("simulate", "--count", "5", "--seed", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5
    assert all(msgspec.json.decode(line)["session_id"].startswith("SID-") for line in lines)


def test_a_spike_brings_factor_times_the_visits_mostly_page_views_of_a_few_pages() -> None:
    from datetime import UTC, datetime

    from clickflow_simulator.generator import ATTACK_PAGES, Spike

    start = datetime(2024, 7, 1, tzinfo=UTC)
    generator = VisitGenerator(seed=9, start=start, visits_per_minute=600, spike=Spike(600, 10, 120))
    per_minute: dict[int, int] = {}
    attack_pages = 0
    for index in range(600 * 10 + 6000 * 2 + 600 * 3):
        offset = generator.offset_s(index)
        visit = generator.visit(index)
        per_minute[int(offset // 60)] = per_minute.get(int(offset // 60), 0) + 1
        if 600 <= offset < 720:
            pages = [e["event"]["details"].get("page_url") for e in visit["events"]]
            attack_pages += all(p in ATTACK_PAGES for p in pages)
    assert per_minute[5] == 600 and per_minute[10] == per_minute[11] == 6000 and per_minute[13] == 600
    assert attack_pages > 0.85 * 12000


def test_a_visit_is_sent_when_it_ends() -> None:
    from datetime import UTC, datetime

    from clickflow.parser import parse_timestamp_us

    start = datetime(2024, 7, 1, tzinfo=UTC)
    generator = VisitGenerator(seed=2, start=start, visits_per_minute=60, event_format="bare")
    for index in range(200):
        visit = generator.visit(index)
        times = [parse_timestamp_us(e["timestamp"]) // 1_000_000 for e in visit["events"]]
        assert max(times) == int(start.timestamp()) + index
