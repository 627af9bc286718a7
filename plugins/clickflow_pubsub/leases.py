"""Bookkeeping of pulled messages until they are settled: flow control and lease extension."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import anyio


@dataclass(slots=True)
class Lease:
    size: int
    received: float
    extended: float


class Leases:
    """Messages pulled and not yet settled, with the limits that pause pulling."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.active: dict[str, Lease] = {}
        self.bytes = 0
        self._freed = anyio.Event()

    def room(self) -> int:
        """How many more messages may be pulled now (0 when either limit is reached)."""
        if self.bytes >= self.max_bytes:
            return 0
        return max(0, self.max_messages - len(self.active))

    async def freed(self) -> None:
        """Wait until some lease is settled (every waiter wakes; check ``room()`` again)."""
        if self._freed.is_set():
            self._freed = anyio.Event()
        await self._freed.wait()

    def add(self, ack_id: str, size: int) -> None:
        # never extended yet: due at once, so the lease is ours (``ack_deadline``) within a second,
        # whatever deadline the subscription itself has (it may be as short as 10s)
        self.active[ack_id] = Lease(size, time.monotonic(), -math.inf)
        self.bytes += size

    def remove(self, ack_ids: list[str]) -> list[Lease]:
        removed = [lease for ack_id in ack_ids if (lease := self.active.pop(ack_id, None)) is not None]
        self.bytes -= sum(lease.size for lease in removed)
        self._freed.set()
        return removed

    def due_for_extension(self, interval: float, max_lease: float) -> list[str]:
        """Ack ids last extended ``interval`` ago or more, and held for less than ``max_lease``."""
        now = time.monotonic()
        due = [
            ack_id
            for ack_id, lease in self.active.items()
            if now - lease.extended >= interval and now - lease.received < max_lease
        ]
        for ack_id in due:
            self.active[ack_id].extended = now
        return due
