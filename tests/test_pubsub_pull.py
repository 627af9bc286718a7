"""The pubsub_pull source against Google's Pub/Sub emulator: exact counts, no loss on failure."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import duckdb
import pytest

from clickflow.config import Pipeline
from clickflow.runtime import Runtime
from tests.conftest import table_counts
from tests.emulators import (
    PubSubEmulator,
    clickflow,
    expected_counts,
    free_port,
    metric,
    simulated_visits,
    start_clickflow,
    wait_for,
    wait_until_quiet,
)

pytestmark = pytest.mark.integration


async def run_until_acknowledged(runtime: Runtime, messages: int, seconds: float = 120) -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(runtime.run)
        with anyio.fail_after(seconds):
            while runtime.summary.acknowledged < messages:  # noqa: ASYNC110 - a counter, not an event
                await anyio.sleep(0.05)
        runtime.request_stop()


@pytest.mark.parametrize("part_bytes", [None, 4096], ids=["whole", "parts"])
def test_every_published_message_is_in_the_tables_exactly_once(
    pubsub_emulator: PubSubEmulator,
    pipeline: Callable[..., Pipeline],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    part_bytes: int | None,
) -> None:
    """Also with each pull's messages leased, emitted and settled in parts of 4 KB, a few visits
    (``api.PART_BYTES``): ten visits of 4.4 MB in one pull response, emitted whole, took a worker
    to 2.4 GB, as the pipeline's channels count batches, not bytes."""
    from clickflow import api

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator.host)
    if part_bytes is not None:
        monkeypatch.setattr(api, "PART_BYTES", part_bytes)
    subscription, expected = pubsub_emulator.published_visits(f"exact-{part_bytes}", 3000, seed=1)
    db = tmp_path / "pull.duckdb"
    runtime = Runtime(pipeline(
        f"sources: [{{type: pubsub_pull, subscription: {subscription}, max_outstanding_messages: 500}}]\n"
        f"sinks: [{{type: duckdb, path: '{db}', batch: {{max_age: 200ms}}}}]\n"
    ))  # fmt: skip
    anyio.run(run_until_acknowledged, runtime, 3000)
    assert runtime.summary.acknowledged == 3000 and runtime.summary.not_acknowledged == 0
    assert table_counts(db) == expected
    metrics = runtime.metrics.registry
    assert metrics.get_sample_value("clickflow_pubsub_pulled_total", {"source": "pubsub_pull"}) == 3000
    assert metrics.get_sample_value("clickflow_pubsub_outstanding", {"source": "pubsub_pull"}) == 0
    settled = metrics.get_sample_value("clickflow_pubsub_ack_latency_seconds_count", {"source": "pubsub_pull"})
    if part_bytes is None:
        assert settled is not None and 3 <= settled <= 3000  # one per pull, each of up to 1,000
    else:
        assert settled is not None and settled >= 3000 * 1000 / part_bytes  # one per part; visits are over 1 KB
    assert expected["dead_letter"] > 0
    time.sleep(1)  # acknowledgements are batched; then nothing may be left to deliver
    assert pubsub_emulator.pull(subscription) == []


HOSTILE_PAYLOADS = [
    b"\xff\xfe\x00 not UTF-8 \xc3\x28",
    b'{"session_id": "S", "events": [' + b"[" * 100_000,
    b"[" * 50_000 + b"]" * 50_000,
    b'{"session_id": "S", "events": []}\x00',
    b"\xef\xbb\xbf" + b'{"session_id": "BOM", "events": []}',
    b'{"session_id": "S", "x": 1e999999, "events": []}',
    b'{"session_id": "S", "user_agent": "' + b"\\u0000" * 1000 + b'", "events": []}',
    b'"just a string"',
    b"{" * 7 + b"}",
    b'{"session_id": "big", "junk": "' + b"x" * (7 << 20) + b'"}',
    b" ",
]
"""Payloads Pub/Sub accepts (data up to 10 MB) that are no visit, or are one only just."""


def test_hostile_messages_are_each_a_row_or_a_dead_letter_and_all_acknowledged(
    pubsub_emulator: PubSubEmulator, pipeline: Callable[..., Pipeline], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator.host)
    topic = pubsub_emulator.topic("hostile")
    subscription = pubsub_emulator.subscription("hostile", topic)
    good = simulated_visits(200, seed=3)
    payloads = good[:100] + HOSTILE_PAYLOADS + good[100:]
    ids = [message_id for payload in payloads for message_id in pubsub_emulator.publish(topic, [payload])]
    db = tmp_path / "hostile.duckdb"
    runtime = Runtime(pipeline(
        f"sources: [{{type: pubsub_pull, subscription: {subscription}}}]\n"
        f"sinks: [{{type: duckdb, path: '{db}', batch: {{max_age: 200ms}}}}]\n"
    ))  # fmt: skip
    anyio.run(run_until_acknowledged, runtime, len(payloads))
    assert runtime.summary.acknowledged == len(payloads) and runtime.summary.not_acknowledged == 0
    assert table_counts(db) == expected_counts(payloads, ids)
    hostile_ids = ids[100 : 100 + len(HOSTILE_PAYLOADS)]
    with duckdb.connect(str(db), read_only=True) as con:
        found = con.execute(
            "SELECT message_id, count(*) FROM (SELECT message_id FROM visits UNION ALL "
            "SELECT message_id FROM dead_letter WHERE event_index IS NULL) WHERE list_contains($ids, message_id) "
            "GROUP BY ALL",
            {"ids": hostile_ids},
        ).fetchall()
    assert sorted(found) == sorted((message_id, 1) for message_id in hostile_ids)  # each once: a visit or a letter
    time.sleep(1)
    assert pubsub_emulator.pull(subscription) == []


def test_two_pull_sources_in_one_pipeline_drain_both_subscriptions_exactly(
    pubsub_emulator: PubSubEmulator, pipeline: Callable[..., Pipeline], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator.host)
    first, first_expected = pubsub_emulator.published_visits("two-a", 1500, seed=11)
    second, second_expected = pubsub_emulator.published_visits("two-b", 1000, seed=12)
    db = tmp_path / "two.duckdb"
    runtime = Runtime(pipeline(
        f"sources: [{{type: pubsub_pull, name: a, subscription: {first}}},"
        f" {{type: pubsub_pull, name: b, subscription: {second}}}]\n"
        f"sinks: [{{type: duckdb, path: '{db}', batch: {{max_age: 200ms}}}}]\n"
    ))  # fmt: skip
    anyio.run(run_until_acknowledged, runtime, 2500)
    assert runtime.summary.messages == {"a": 1500, "b": 1000}
    assert table_counts(db) == {t: first_expected[t] + second_expected[t] for t in first_expected}
    metrics = runtime.metrics.registry
    for source, count in (("a", 1500), ("b", 1000)):
        assert metrics.get_sample_value("clickflow_pubsub_pulled_total", {"source": source}) == count


def test_a_failing_sink_causes_redelivery_not_loss(
    pubsub_emulator: PubSubEmulator, registry: object, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from clickflow.config import parse_pipeline
    from clickflow.plugins import load_plugins
    from tests import flaky_sink

    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", pubsub_emulator.host)
    subscription, expected = pubsub_emulator.published_visits("flaky", 1000, seed=2)
    db = tmp_path / "flaky.duckdb"
    flaky = load_plugins(extra=[(flaky_sink, "tests")])
    runtime = Runtime(parse_pipeline(
        f"sources: [{{type: pubsub_pull, subscription: {subscription}, max_messages_per_pull: 100}}]\n"
        f"sinks: [{{type: flaky_duckdb, fail_first: 4, path: '{db}', batch: {{max_rows: 300, max_age: 100ms}},"
        f" retry: {{attempts: 2, initial_backoff: 10ms}}}}]\n",
        flaky, "t.yaml", {},
    ))  # fmt: skip
    anyio.run(run_until_acknowledged, runtime, 1000)
    assert runtime.summary.not_acknowledged > 0, "the injected failures should have handed batches back"
    assert table_counts(db) == expected


def pull_pipeline(tmp_path: Path, subscription: str, port: int, db: Path, sink: str = "") -> Path:
    pipeline = tmp_path / "pull.yaml"
    pipeline.write_text(
        f"sources: [{{type: pubsub_pull, subscription: {subscription}, ack_deadline: 10s}}]\n"
        f"sinks: [{{type: duckdb, path: '{db}'{sink}}}]\nmonitor: {{port: {port}}}\n"
        "runtime: {shutdown_timeout: 20s}\n"
    )
    return pipeline


def test_sigkill_mid_stream_then_restart_loses_nothing(pubsub_emulator: PubSubEmulator, tmp_path: Path) -> None:
    subscription, expected = pubsub_emulator.published_visits("killed", 20_000, seed=3)
    port, db = free_port(), tmp_path / "killed.duckdb"
    pipeline = pull_pipeline(tmp_path, subscription, port, db, ", batch: {max_age: 200ms}")
    first = start_clickflow(pipeline, pubsub_emulator.host)
    try:
        wait_for(lambda: metric(port, "clickflow_messages_acknowledged_total") > 0, 60)
    finally:
        first.kill()
        first.communicate()
    second = start_clickflow(pipeline, pubsub_emulator.host)
    try:
        wait_for(lambda: metric(port, "clickflow_messages_received_total") > 0, 60)
        wait_until_quiet([port], quiet=12)
        second.send_signal(signal.SIGTERM)
    finally:
        _, stderr = second.communicate(timeout=60)
    assert second.returncode == 0, stderr
    assert table_counts(db) == expected


def test_sigterm_during_a_busy_pull_exits_0_in_time_without_loss(
    pubsub_emulator: PubSubEmulator, tmp_path: Path
) -> None:
    topic = pubsub_emulator.topic("sigterm")
    subscription = pubsub_emulator.subscription("sigterm", topic)
    published = set(pubsub_emulator.publish(topic, simulated_visits(20_000, seed=4)))
    port, db = free_port(), tmp_path / "sigterm.duckdb"
    pipeline = pull_pipeline(tmp_path, subscription, port, db)
    process = start_clickflow(pipeline, pubsub_emulator.host)
    try:
        wait_for(lambda: metric(port, "clickflow_messages_received_total") > 2000, 60)
        stopped = time.monotonic()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
        took = time.monotonic() - stopped
    finally:
        process.kill()
    assert process.returncode == 0, stderr
    assert took < 20
    # every message is either written (and acknowledged: gone from the subscription) or still there
    assert "not acknowledged" not in stdout
    time.sleep(11)  # anything leased by the stopped process is deliverable again
    remaining: set[str] = set()
    while batch := pubsub_emulator.pull(subscription):
        remaining |= {m["message"]["messageId"] for m in batch}
    written = _written_message_ids(db)
    assert written and not written & remaining
    assert written | remaining == published


def _written_message_ids(db: Path) -> set[str]:
    import duckdb

    with duckdb.connect(str(db), read_only=True) as con:
        rows = con.execute(
            "SELECT message_id FROM visits UNION SELECT message_id FROM dead_letter WHERE event_index IS NULL"
        ).fetchall()
    return {row[0] for row in rows}


def test_simulate_publishes_to_a_topic(pubsub_emulator: PubSubEmulator) -> None:
    topic = pubsub_emulator.topic("simulated")
    subscription = pubsub_emulator.subscription("simulated", topic)
    env = {"PUBSUB_EMULATOR_HOST": pubsub_emulator.host}
    result = clickflow("simulate", "--topic", topic, "--count", "2500", "--seed", "5", env=env)
    assert result.returncode == 0, result.stderr
    assert re.match(r"published 2,500 visits in [\d.]+s \([\d,]+/s\)", result.stderr)
    received = []
    while batch := pubsub_emulator.pull(subscription):
        received += batch
    assert len({m["message"]["messageId"] for m in received}) == 2500


def test_publishing_to_a_missing_topic_fails_in_one_line(pubsub_emulator: PubSubEmulator) -> None:
    topic = f"projects/{pubsub_emulator.project}/topics/nope"
    result = clickflow(
        "simulate", "--topic", topic, "--count", "10", env={"PUBSUB_EMULATOR_HOST": pubsub_emulator.host}
    )
    assert result.returncode == 1
    assert result.stderr.startswith(f"Error: cannot publish to {topic}: 404 Not Found"), result.stderr
    assert "Topic not found" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_subscription_fails_the_run_clearly(pubsub_emulator: PubSubEmulator, tmp_path: Path) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"sources: [{{type: pubsub_pull, subscription: projects/{pubsub_emulator.project}/subscriptions/nope}}]\n"
        f"sinks: [{{type: duckdb, path: '{tmp_path}/x.duckdb'}}]\n"
    )
    process = start_clickflow(pipeline, pubsub_emulator.host)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 1
    assert "source 'pubsub_pull' failed: cannot pull projects/clickflow-test/subscriptions/nope: 404" in stderr
    assert "Traceback" not in stderr
