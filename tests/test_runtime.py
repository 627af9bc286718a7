"""Runtime behaviour with fake plugins: acknowledge after sink, backpressure, batching, shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from clickflow import api
from clickflow.api import Message
from clickflow.config import Pipeline
from clickflow.report import format_summary
from clickflow.runtime import PipelineError, Runtime
from clickflow.summary import RunSummary
from tests import fakes
from tests.conftest import table_counts
from tests.fakes import MemorySink, ScriptSource

pytestmark = pytest.mark.anyio


async def test_batches_are_acknowledged_after_every_sink_wrote_them(fake_pipeline: Callable[[str], Pipeline]) -> None:
    MemorySink.gate, MemorySink.written = anyio.Event(), anyio.Event()
    runtime = Runtime(fake_pipeline("""
sources: [{type: script, batches: 3, per_batch: 2}]
sinks: [{type: memory, name: fast}, {type: memory, name: slow, gated: true, batch: {max_rows: 1}}]
"""))  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(runtime.run)
        await MemorySink.written.wait()
        assert all(ack.acked == 0 for ack in ScriptSource.acks), "acknowledged before the gated sink wrote"
        MemorySink.gate.set()
    assert [ack.acked for ack in ScriptSource.acks] == [1, 1, 1]
    assert fakes.counts(MemorySink.writes, "fast") == fakes.counts(MemorySink.writes, "slow") == {
        "visits": 6, "events": 0, "purchase_items": 0, "dead_letter": 0,
    }  # fmt: skip
    assert runtime.summary.acknowledged == 6


async def test_a_message_that_comes_twice_in_one_batch_is_stored_once(
    fake_pipeline: Callable[[str], Pipeline], tmp_path: Path
) -> None:
    """Two push requests of one message at once (Pub/Sub sending it again while the first waits)
    share a batch: DuckDB, which drops a message it holds already, stored both copies."""
    db = tmp_path / "repeated.duckdb"
    runtime = Runtime(fake_pipeline(f"""
sources: [{{type: script, batches: 2, per_batch: 3, repeat: 2}}]
sinks: [{{type: duckdb, path: '{db}'}}, {{type: memory}}]
"""))  # fmt: skip
    await runtime.run()
    assert table_counts(db) == {"visits": 6, "events": 0, "purchase_items": 0, "dead_letter": 0}
    assert fakes.counts(MemorySink.writes, "memory")["visits"] == 6
    assert [ack.acked for ack in ScriptSource.acks] == [1, 1]  # each batch whole, its copies with it
    assert (runtime.summary.repeated, runtime.summary.rows["visits"], runtime.summary.acknowledged) == (6, 6, 12)
    assert runtime.metrics.registry.get_sample_value("clickflow_messages_repeated_total", {"source": "script"}) == 6
    assert "repeated in a batch              6  (parsed once)" in format_summary(runtime.summary)


async def test_a_batch_of_many_bytes_is_parsed_and_written_in_parts_and_acknowledged_once(
    fake_pipeline: Callable[[str], Pipeline], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows cost up to about eleven times their message, and the channels count parts, not bytes:
    ten large messages of one pull, parsed and written together, took a worker to 2.4 GB."""
    size = len(b'{"session_id": "S0-0"}')
    monkeypatch.setattr(api, "PART_BYTES", 2 * size)  # two of the script's messages
    runtime = Runtime(fake_pipeline("""
sources: [{type: script, batches: 2, per_batch: 5}]
sinks: [{type: memory, batch: {max_rows: 1}}]
"""))  # fmt: skip
    await runtime.run()
    assert [len(batch.tables["visits"]) for _, batch in MemorySink.writes] == [2, 2, 1, 2, 2, 1]
    assert fakes.counts(MemorySink.writes, "memory")["visits"] == 10
    assert [(ack.acked, ack.nacked) for ack in ScriptSource.acks] == [(1, []), (1, [])]  # once all its parts are
    assert runtime.summary.acknowledged == 10


@pytest.mark.parametrize(
    ("sizes", "parts"),
    [([3, 1], [[3, 1]]), ([2, 2, 1], [[2, 2], [1]]), ([9, 1, 1, 9], [[9], [1, 1], [9]]), ([1, 4, 4], [[1], [4], [4]])],
)
def test_a_part_holds_messages_within_part_bytes_or_one_larger_message(
    sizes: list[int], parts: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(api, "PART_BYTES", 4)
    messages = [Message(bytes(size), str(number)) for number, size in enumerate(sizes)]
    cut = [part for part, size in api.parts_of(messages) if size == sum(len(m.data) for m in part)]
    assert [[len(m.data) for m in part] for part in cut] == parts
    assert [m for part in cut for m in part] == messages


async def test_a_batch_is_discarded_once_written_not_before(fake_pipeline: Callable[[str], Pipeline]) -> None:
    await Runtime(fake_pipeline("""
sources: [{type: script, batches: 3}]
sinks: [{type: memory, fail_first: 1, batch: {max_rows: 1}, retry: {attempts: 2, initial_backoff: 1ms}}]
""")).run()  # fmt: skip
    assert [batch.discarded for _, batch in MemorySink.writes] == [1, 1, 1]  # type: ignore[attr-defined]


async def test_transient_sink_failures_are_retried(fake_pipeline: Callable[[str], Pipeline]) -> None:
    summary = await Runtime(fake_pipeline("""
sources: [{type: script, batches: 2}]
sinks: [{type: memory, fail_first: 2, retry: {attempts: 3, initial_backoff: 1ms}}]
""")).run()  # fmt: skip
    assert MemorySink.attempts == 3
    assert fakes.counts(MemorySink.writes, "memory")["visits"] == 2
    assert summary.acknowledged == 2 and summary.not_acknowledged == 0


async def test_persistent_sink_failure_nacks_and_fails_the_run(fake_pipeline: Callable[[str], Pipeline]) -> None:
    runtime = Runtime(fake_pipeline("""
sources: [{type: script, batches: 2}]
sinks: [{type: memory, fail_first: 100, retry: {attempts: 2, initial_backoff: 1ms}}]
"""))  # fmt: skip
    with pytest.raises(PipelineError, match=r"sink 'memory' failed: sink unavailable \(attempt 2\)"):
        await runtime.run()
    assert sum(a.acked for a in ScriptSource.acks) == 0
    assert all(len(a.nacked) == 1 for a in ScriptSource.acks)
    assert runtime.summary.not_acknowledged == 2


async def test_a_failure_without_text_is_named_by_its_type(
    fake_pipeline: Callable[[str], Pipeline], caplog: pytest.LogCaptureFixture
) -> None:
    """A client's timeout raises ``TimeoutError()``: its retries and the run's end still say what failed."""
    runtime = Runtime(fake_pipeline("""
sources: [{type: script, batches: 1}]
sinks: [{type: memory, fail_first: 100, textless: true, retry: {attempts: 2, initial_backoff: 1ms}}]
"""))  # fmt: skip
    with pytest.raises(PipelineError, match=r"^sink 'memory' failed: TimeoutError$"):
        await runtime.run()
    retried = [r.getMessage() for r in caplog.records if "write failed" in r.getMessage()]
    assert retried == ["sink memory: write failed (attempt 1 of 2): TimeoutError"]


async def test_a_permanent_write_error_is_not_retried(fake_pipeline: Callable[[str], Pipeline]) -> None:
    runtime = Runtime(fake_pipeline("""
sources: [{type: script, batches: 1}]
sinks: [{type: memory, fail_first: 100, permanent: true, retry: {attempts: 5, initial_backoff: 1ms}}]
"""))  # fmt: skip
    with pytest.raises(PipelineError, match=r"sink 'memory' failed: table missing \(attempt 1\)"):
        await runtime.run()
    assert MemorySink.attempts == 1


async def test_a_failing_sink_hands_batches_back_to_a_redelivering_source(
    fake_pipeline: Callable[[str], Pipeline],
) -> None:
    summary = await Runtime(fake_pipeline("""
sources: [{type: script, batches: 5, redelivers: true}]
sinks: [{type: memory, fail_first: 2, batch: {max_rows: 1}, retry: {attempts: 1}}]
""")).run()  # fmt: skip
    assert [len(a.nacked) for a in ScriptSource.acks] == [1, 1, 0, 0, 0]
    assert [a.acked for a in ScriptSource.acks] == [0, 0, 1, 1, 1]
    assert (summary.acknowledged, summary.not_acknowledged) == (3, 2)


async def test_a_sink_failing_too_long_fails_even_a_redelivering_run(fake_pipeline: Callable[[str], Pipeline]) -> None:
    with pytest.raises(PipelineError, match="sink 'memory' failed"):
        await Runtime(fake_pipeline("""
sources: [{type: script, forever: true, redelivers: true}]
sinks: [{type: memory, fail_first: 1000000, batch: {max_rows: 1}, retry: {attempts: 1, give_up_after: 50ms}}]
""")).run()  # fmt: skip


async def test_a_blocked_sink_stops_the_source(fake_pipeline: Callable[[str], Pipeline]) -> None:
    MemorySink.gate = anyio.Event()
    runtime = Runtime(fake_pipeline("""
sources: [{type: script, forever: true}]
sinks: [{type: memory, gated: true, batch: {max_rows: 1}}]
runtime: {channel_capacity: 2}
"""))  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(runtime.run)
        await anyio.sleep(0.3)
        emitted = len(ScriptSource.emitted)
        # two channels of 2, one batch in the parser, one gathered, one being written
        assert emitted <= 8, f"source ran ahead of a blocked sink: {emitted} batches"
        await anyio.sleep(0.2)
        assert len(ScriptSource.emitted) == emitted
        MemorySink.gate.set()
        runtime.request_stop()
    # everything that entered the pipeline is written and acknowledged; the batch the source
    # was blocked on when it was stopped never entered, and is handed back (nacked)
    assert runtime.summary.acknowledged == fakes.counts(MemorySink.writes, "memory")["visits"] == emitted
    assert runtime.summary.not_acknowledged == 0
    assert len(ScriptSource.acks[-1].nacked) == 1


async def test_sinks_get_batches_bounded_by_rows(fake_pipeline: Callable[[str], Pipeline]) -> None:
    await Runtime(fake_pipeline("""
sources: [{type: script, batches: 10, per_batch: 3}]
sinks: [{type: memory, batch: {max_rows: 6, max_age: 1h}}]
""")).run()  # fmt: skip
    sizes = [len(batch) for _, batch in MemorySink.writes]
    assert sum(sizes) == 30
    assert all(size == 6 for size in sizes)


async def test_a_partial_batch_is_written_when_it_reaches_max_age(fake_pipeline: Callable[[str], Pipeline]) -> None:
    runtime = Runtime(fake_pipeline("""
sources: [{type: script, forever: true, per_batch: 1}]
sinks: [{type: memory, batch: {max_rows: 1000000, max_age: 50ms}}]
"""))  # fmt: skip
    MemorySink.written = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(runtime.run)
        with anyio.fail_after(5):
            await MemorySink.written.wait()
        runtime.request_stop()
    assert len(MemorySink.writes) >= 1


async def test_a_batch_past_its_age_gathers_until_the_sink_is_free(fake_pipeline: Callable[[str], Pipeline]) -> None:
    """Group commit: with max_age 0 a lone message is written at once, and everything that arrives
    while that write lasts goes in the next one, while the source keeps emitting."""
    MemorySink.gate = anyio.Event()
    runtime = Runtime(fake_pipeline("""
sources: [{type: script, batches: 20}]
sinks: [{type: memory, gated: true, batch: {max_age: 0s}}]
runtime: {channel_capacity: 2}
"""))  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(runtime.run)
        with anyio.fail_after(5):
            await ScriptSource.wait_for_emitted(20)  # more than the channels hold: the worker gathered
        await anyio.sleep(0.1)
        assert MemorySink.writes == []
        MemorySink.gate.set()
    assert [len(batch) for _, batch in MemorySink.writes] == [1, 19]
    assert runtime.summary.acknowledged == 20


@pytest.mark.parametrize(("finite", "sizes"), [(True, [1, 19]), (False, [20])])
async def test_a_finite_sources_rows_are_written_whenever_the_sink_is_free(
    fake_pipeline: Callable[[str], Pipeline], finite: bool, sizes: list[int]
) -> None:
    """A file's input is all there: its rows skip max_age, so the sink starts on the first batch
    and gathers the rest meanwhile. A stream's rows wait for max_age (here, for the end)."""
    MemorySink.gate = anyio.Event()
    runtime = Runtime(fake_pipeline(f"""
sources: [{{type: script, batches: 20, finite: {str(finite).lower()}}}]
sinks: [{{type: memory, gated: true, batch: {{max_age: 1h}}}}]
runtime: {{channel_capacity: 2}}
"""))  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(runtime.run)
        with anyio.fail_after(5):
            await ScriptSource.wait_for_emitted(20)
        await anyio.sleep(0.1)
        MemorySink.gate.set()
    assert [len(batch) for _, batch in MemorySink.writes] == sizes
    assert runtime.summary.acknowledged == 20


async def test_until_parsed_returns_once_the_parser_handed_the_sources_batches_to_the_sinks(
    fake_pipeline: Callable[[str], Pipeline],
) -> None:
    """What a coalescing source (the push endpoint) waits on: the parse, not the write."""
    MemorySink.gate = anyio.Event()
    runtime = Runtime(fake_pipeline("""
sources: [{type: script, batches: 3, per_batch: 2, until_parsed: true}]
sinks: [{type: memory, gated: true, batch: {max_rows: 1}}]
"""))  # fmt: skip
    parsed_then: list[int] = []
    ScriptSource.on_parsed = staticmethod(lambda number: parsed_then.append(runtime.summary.rows["visits"]))
    async with anyio.create_task_group() as tg:
        tg.start_soon(runtime.run)
        with anyio.fail_after(5):
            while len(parsed_then) < 3:  # noqa: ASYNC110 - the fake source records, it signals nothing
                await anyio.sleep(0.01)
        assert parsed_then == [2, 4, 6], "each wait ended once that batch, and no later one, was parsed"
        assert all(ack.acked == 0 for ack in ScriptSource.acks), "none of them written yet"
        MemorySink.gate.set()
    assert runtime.summary.acknowledged == 6


@pytest.mark.parametrize(("event_loop", "on_uvloop"), [("auto", True), ("uvloop", True), ("asyncio", False)])
def test_a_run_is_on_the_event_loop_its_runtime_options_name(
    fake_pipeline: Callable[[str], Pipeline], clickflow_run: Callable[[Pipeline], RunSummary], event_loop: str,
    on_uvloop: bool,
) -> None:  # fmt: skip
    import uvloop

    pipeline = fake_pipeline(f"""
sources: [{{type: script, batches: 2, until_parsed: true}}]
sinks: [{{type: memory}}]
runtime: {{event_loop: {event_loop}}}
""")  # fmt: skip
    loops: list[asyncio.AbstractEventLoop] = []
    ScriptSource.on_parsed = staticmethod(lambda number: loops.append(asyncio.get_running_loop()))
    assert clickflow_run(pipeline).acknowledged == 2
    assert [isinstance(loop, uvloop.Loop) for loop in loops] == [on_uvloop, on_uvloop]


async def test_stop_drains_and_acknowledges_everything_in_flight(fake_pipeline: Callable[[str], Pipeline]) -> None:
    runtime = Runtime(fake_pipeline("""
sources: [{type: script, forever: true, per_batch: 5}]
sinks: [{type: memory, batch: {max_rows: 100000, max_age: 1h}}]
"""))  # fmt: skip
    async with anyio.create_task_group() as tg:
        tg.start_soon(runtime.run)
        await ScriptSource.wait_for_emitted(20)
        runtime.request_stop()
    summary = runtime.summary
    assert summary.not_acknowledged == 0
    assert summary.acknowledged == sum(summary.messages.values()) == fakes.counts(MemorySink.writes, "memory")["visits"]


async def test_stop_gives_up_after_the_shutdown_deadline(fake_pipeline: Callable[[str], Pipeline]) -> None:
    MemorySink.gate = anyio.Event()  # never set: the sink hangs
    runtime = Runtime(fake_pipeline("""
sources: [{type: script, forever: true}]
sinks: [{type: memory, gated: true, batch: {max_rows: 1}}]
runtime: {shutdown_timeout: 200ms}
"""))  # fmt: skip

    async def stop_once_running() -> None:
        await ScriptSource.wait_for_emitted(1)
        runtime.request_stop()
        nonlocal stopped
        stopped = anyio.current_time()

    stopped = 0.0
    async with anyio.create_task_group() as tg:
        tg.start_soon(stop_once_running)
        with anyio.fail_after(5):
            await runtime.run()
    assert 0.15 < anyio.current_time() - stopped < 3
    assert runtime.summary.acknowledged == 0
    assert runtime.summary.not_acknowledged == sum(runtime.summary.messages.values()) > 0


async def test_a_failing_source_fails_the_run_with_its_reason(fake_pipeline: Callable[[str], Pipeline]) -> None:
    with pytest.raises(PipelineError, match=r"source 'failing' failed: no such file: visits\.jsonl"):
        await Runtime(fake_pipeline("sources: [{type: failing}]\nsinks: [{type: memory}]")).run()


async def test_a_sink_that_fails_to_open_is_closed_all_the_same(fake_pipeline: Callable[[str], Pipeline]) -> None:
    """Closing what a failed ``open`` made is the runtime's, not each sink's: one sink forgot it."""
    sinks = "sinks: [{type: memory, name: a}, {type: memory, name: b, fail_open: true}, {type: memory, name: c}]"
    with pytest.raises(PipelineError, match=r"sink 'b' could not start: cannot connect"):
        await Runtime(fake_pipeline(f"sources: [{{type: failing}}]\n{sinks}")).run()
    assert MemorySink.closed == 2  # b, then a; c was never opened


async def test_health_follows_source_heartbeats(fake_pipeline: Callable[[str], Pipeline]) -> None:
    runtime = Runtime(
        fake_pipeline("sources: [{type: script}]\nsinks: [{type: memory}]\nruntime: {heartbeat_max_age: 10s}")
    )
    runtime.heartbeats["script"] = 1000.0
    assert runtime.healthy(now=1005.0)
    assert not runtime.healthy(now=1011.0)
