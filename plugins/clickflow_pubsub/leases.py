"""Bookkeeping of pulled messages until they are settled: flow control and lease extension.

A lease covers one pull's messages, which the pipeline settles together (its batch is acknowledged
or handed back as a whole), so the bookkeeping costs one object per pull, not per message.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import anyio


@dataclass(slots=True, eq=False)
class Lease:
    ack_ids: list[str]
    size: int
    """Bytes of message data."""
    received: float
    extended: float


class Leases:
    """Messages pulled and not yet settled, with the limits that pause pulling."""

    def __init__(self, max_messages: int, max_bytes: int) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.active: dict[Lease, None] = {}  # a set that keeps the oldest first
        self.messages = 0
        self.bytes = 0
        self._freed = anyio.Event()

    def room(self) -> int:
        """How many more messages may be pulled now (0 when either limit is reached)."""
        if self.bytes >= self.max_bytes:
            return 0
        return max(0, self.max_messages - self.messages)

    async def freed(self) -> None:
        """Wait until some lease is settled (every waiter wakes; check ``room()`` again)."""
        if self._freed.is_set():
            self._freed = anyio.Event()
        await self._freed.wait()

    def add(self, ack_ids: list[str], size: int) -> Lease:
        """Hold one pull's messages. Never extended yet: due at once, so the lease is ours
        (``ack_deadline``) within a second, whatever deadline the subscription has (maybe 10s)."""
        lease = Lease(ack_ids, size, time.monotonic(), -math.inf)
        self.active[lease] = None
        self.messages += len(ack_ids)
        self.bytes += size
        return lease

    def remove(self, lease: Lease) -> None:
        if self.active.pop(lease, False) is None:
            self.messages -= len(lease.ack_ids)
            self.bytes -= lease.size
        self._freed.set()

    def due_for_extension(self, interval: float, max_lease: float) -> list[str]:
        """Ack ids last extended ``interval`` ago or more, and held for less than ``max_lease``."""
        now = time.monotonic()
        due: list[str] = []
        for lease in self.active:
            if now - lease.extended >= interval and now - lease.received < max_lease:
                due += lease.ack_ids
                lease.extended = now
        return due
