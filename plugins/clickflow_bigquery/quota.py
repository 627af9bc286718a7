"""Spacing load jobs under BigQuery's daily quota (1,500 per table per day)."""

from __future__ import annotations

import logging

import anyio

log = logging.getLogger(__name__)

DAY = 86_400.0


class JobBudget:
    """A token bucket: ``burst`` jobs at once, refilled at ``per_day`` jobs a day."""

    def __init__(self, per_day: int, burst: int) -> None:
        self.rate = per_day / DAY
        self.burst = burst
        self._tokens = float(burst)
        self._at = anyio.current_time()
        self._lock = anyio.Lock()

    def _refill(self) -> None:
        now = anyio.current_time()
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now

    async def take(self, what: str) -> None:
        """Wait until a job may start, then use up one token."""
        async with self._lock:
            self._refill()
            if self._tokens < 1:
                wait = (1 - self._tokens) / self.rate
                log.info("%s: waiting %.0fs for the load job quota", what, wait)
                await anyio.sleep(wait)
                self._refill()
            self._tokens -= 1
