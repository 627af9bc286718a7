"""Poison messages: a message that keeps a sink's write failing is isolated, then dead-lettered.

When a batch from a redelivering source (Pub/Sub) fails in a sink beyond its retries,
its messages are handed back and become *suspects*. On redelivery the runtime writes
each suspect in a batch of its own, so its batch-mates are stored without it. A suspect
whose own write fails while the sink is otherwise healthy (its previous write worked)
has a strike; at ``strikes`` it is stored as a ``dead_letter`` row (reason
``unwritable``, with the sink's error and the head of its payload) instead of being
redelivered forever. A sink that fails for everything does not give strikes: that is
an outage, which ``retry.give_up_after`` ends.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Suspect:
    strikes: int = 0
    error: str = ""


class Quarantine:
    """Suspect message ids, bounded: the oldest are forgotten first."""

    def __init__(self, strikes: int = 3, capacity: int = 100_000) -> None:
        self.strikes = strikes
        self.capacity = capacity
        self._suspects: dict[str, Suspect] = {}

    def __bool__(self) -> bool:
        return bool(self._suspects)

    def __contains__(self, message_id: str) -> bool:
        return message_id in self._suspects

    def suspect(self, message_ids: list[str]) -> None:
        """These messages were in a batch a sink could not write."""
        for message_id in message_ids:
            if message_id not in self._suspects:
                if len(self._suspects) >= self.capacity:
                    del self._suspects[next(iter(self._suspects))]
                self._suspects[message_id] = Suspect()

    def strike(self, message_id: str, error: str) -> None:
        """The message failed alone while the sink was otherwise writing."""
        suspect = self._suspects.setdefault(message_id, Suspect())
        suspect.strikes += 1
        suspect.error = error

    def condemned(self, message_id: str) -> Suspect | None:
        """The suspect, if it has failed alone often enough to be dead-lettered."""
        suspect = self._suspects.get(message_id)
        return suspect if suspect is not None and suspect.strikes >= self.strikes else None

    def clear(self, message_id: str) -> None:
        """Stored at last (alone, or as a dead letter): no longer a suspect."""
        self._suspects.pop(message_id, None)
