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
