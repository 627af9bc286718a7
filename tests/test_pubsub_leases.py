"""Flow control of the pull source: outstanding limits, waking every waiter, lease extension."""

from __future__ import annotations

import anyio
import pytest

from clickflow_pubsub.leases import Leases

pytestmark = pytest.mark.anyio


def test_room_is_bounded_by_messages_and_bytes() -> None:
    leases = Leases(max_messages=3, max_bytes=100)
    assert leases.room() == 3
    leases.add(["a", "b"], 20)
    assert leases.room() == 1
    big = leases.add(["c"], 90)
    assert leases.room() == 0
    leases.remove(big)
    assert leases.room() == 1
    leases.remove(big)  # settled twice (a late nack after a stop): counted once
    assert leases.room() == 1 and leases.messages == 2


async def test_every_waiting_pull_loop_wakes_when_leases_are_settled() -> None:
    leases = Leases(max_messages=1, max_bytes=1000)
    lease = leases.add(["a"], 1)
    woken: list[int] = []

    async def pull_loop(number: int) -> None:
        await leases.freed()
        woken.append(number)

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(pull_loop, 1)
            tg.start_soon(pull_loop, 2)
            await anyio.sleep(0.05)
            leases.remove(lease)
    assert sorted(woken) == [1, 2]


def test_leases_are_taken_at_once_then_extended_at_the_interval_until_max_lease(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import clickflow_pubsub.leases as module

    now = [1000.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: now[0])
    leases = Leases(max_messages=10, max_bytes=1000)
    leases.add(["a", "b"], 2)
    assert leases.due_for_extension(interval=30, max_lease=100) == ["a", "b"]  # the subscription's may be short
    assert leases.due_for_extension(interval=30, max_lease=100) == []
    now[0] += 10
    leases.add(["c"], 1)
    assert leases.due_for_extension(interval=30, max_lease=100) == ["c"]
    now[0] += 21
    assert leases.due_for_extension(interval=30, max_lease=100) == ["a", "b"]
    assert leases.due_for_extension(interval=30, max_lease=100) == []
    now[0] += 80  # held for 111s: past max_lease, left to expire and be redelivered
    assert leases.due_for_extension(interval=30, max_lease=100) == []


async def test_the_parts_of_a_pull_left_unsent_when_it_is_stopped_are_negatively_acknowledged() -> None:
    """Leased at once, emitted one after the other: the part being sent is handed back by ``emit``
    itself, and the ones after it must not wait for their deadlines to come again."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from clickflow.api import Message
    from clickflow_pubsub.pull import PubSubPullOptions, PubSubPullSource, _Metrics

    sent: list[list[str]] = []

    async def emit(messages: list[Message], ack: object) -> None:
        if sent:
            ack.nack(anyio.get_cancelled_exc_class()())  # type: ignore[attr-defined]
            raise anyio.get_cancelled_exc_class()
        sent.append([m.message_id for m in messages])

    context = SimpleNamespace(registry=CollectorRegistry(), emit=emit)
    source = PubSubPullSource("pull", PubSubPullOptions(subscription="projects/p/subscriptions/s"))
    source._leases, source._to_ack, source._to_nack = Leases(100, 1 << 20), [], []
    source._ack_wanted, source._metrics = anyio.Event(), _Metrics(context, "pull")  # type: ignore[arg-type]
    received = [SimpleNamespace(ack_id=f"ack-{n}") for n in range(5)]
    parts = [([Message(b"x", f"m{n}") for n in part], len(part)) for part in ([0, 1], [2], [3, 4])]
    with pytest.raises(anyio.get_cancelled_exc_class()):
        await source._emit(context, received, parts)  # type: ignore[arg-type]
    assert sent == [["m0", "m1"]]
    assert source._to_nack == ["ack-2", "ack-3", "ack-4"] and source._to_ack == []
    assert source._leases.messages == 2  # the part sent is the pipeline's to settle
