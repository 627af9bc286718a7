"""Poison messages: one message a sink cannot store is isolated, then dead-lettered, instead of
taking its batch-mates with it and coming back forever (``clickflow/quarantine.py``)."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import pytest

from clickflow.config import Pipeline
from clickflow.quarantine import Quarantine
from clickflow.runtime import Runtime
from tests.fakes import MemorySink, RedeliveringSource

pytestmark = pytest.mark.anyio


def stored(table: str, column: int) -> set[str]:
    return {row[column] for _, batch in MemorySink.writes for row in batch.tables[table]}


@pytest.mark.parametrize("per_batch", [1, 10])
async def test_a_poison_message_is_dead_lettered_and_its_batch_mates_stored(
    fake_pipeline: Callable[[str], Pipeline], per_batch: int
) -> None:
    runtime = Runtime(fake_pipeline(f"""
sources: [{{type: redelivering, messages: 50, per_batch: {per_batch}}}]
sinks: [{{type: memory, poison: m23, batch: {{max_rows: 1000, max_age: 10ms}},
         retry: {{attempts: 2, initial_backoff: 1ms, give_up_after: 1h}}}}]
"""))  # fmt: skip
    with anyio.fail_after(30):
        summary = await runtime.run()
    assert stored("visits", 12) == {f"m{n}" for n in range(50)} - {"m23"}
    (dead,) = [row for _, batch in MemorySink.writes for row in batch.tables["dead_letter"]]
    assert (dead[3], dead[5]) == ("m23", "unwritable")
    assert "cannot store message m23" in dead[6] and dead[7] == '{"session_id": "S23"}'
    assert summary.dead_letters == {"unwritable": 1}
    assert RedeliveringSource.deliveries < 3 * 50  # each message back a few times at most, then done


async def test_a_poison_message_failing_without_text_is_dead_lettered_with_its_type(
    fake_pipeline: Callable[[str], Pipeline],
) -> None:
    runtime = Runtime(fake_pipeline("""
sources: [{type: redelivering, messages: 5, per_batch: 5}]
sinks: [{type: memory, poison: m3, textless: true, batch: {max_rows: 1000, max_age: 10ms},
         retry: {attempts: 1, initial_backoff: 1ms, give_up_after: 1h}}]
"""))  # fmt: skip
    with anyio.fail_after(30):
        await runtime.run()
    (dead,) = [row for _, batch in MemorySink.writes for row in batch.tables["dead_letter"]]
    assert (dead[3], dead[5]) == ("m3", "unwritable")
    assert dead[6].endswith("sink 'memory': TimeoutError")


async def test_an_outage_strikes_no_message(fake_pipeline: Callable[[str], Pipeline]) -> None:
    """A sink failing for everything is an outage: messages come back and are stored when it recovers."""
    runtime = Runtime(fake_pipeline("""
sources: [{type: redelivering, messages: 20, per_batch: 5}]
sinks: [{type: memory, fail_first: 30, batch: {max_age: 10ms}, retry: {attempts: 1, initial_backoff: 1ms}}]
"""))  # fmt: skip
    with anyio.fail_after(30):
        summary = await runtime.run()
    assert stored("visits", 12) == {f"m{n}" for n in range(20)}
    assert summary.dead_letters == {}


def test_strikes_need_the_same_message_to_fail_alone() -> None:
    quarantine = Quarantine(strikes=2)
    quarantine.suspect(["a", "b"])
    assert "a" in quarantine and quarantine.condemned("a") is None
    quarantine.strike("a", "boom")
    assert quarantine.condemned("a") is None
    quarantine.strike("a", "boom again")
    condemned = quarantine.condemned("a")
    assert condemned is not None and condemned.error == "boom again"
    quarantine.clear("b")
    assert "b" not in quarantine


def test_the_quarantine_forgets_its_oldest_suspects_first() -> None:
    quarantine = Quarantine(capacity=3)
    quarantine.suspect(["a", "b", "c", "d"])
    assert "a" not in quarantine and all(m in quarantine for m in "bcd")
