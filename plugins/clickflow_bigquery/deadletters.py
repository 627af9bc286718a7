"""The BigQuery sinks' dead letters for ``clickflow dlq``: read, re-stored without duplicates, marked.

Marking is a DML ``UPDATE``, which BigQuery refuses on rows still in a table's streaming buffer
(rows streamed in the last minutes, up to about 90). Dead letters received after the buffer's
oldest entry, less a margin, are left for a later replay and counted as held back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from clickflow.api import RowBatch
from clickflow.dlq import PAGE_ROWS, DeadLetterGroup, DeadLetterPage, DeadLetterQuery, StoredDeadLetter
from clickflow.parser import VisitContext
from clickflow_bigquery.client import BigQueryClient
from clickflow_bigquery.rows import ROW_IDS

BUFFER_MARGIN_US = 30 * 60 * 1_000_000
"""Between receiving a dead letter and streaming it: batching and retries take minutes at most."""
IDS_PER_QUERY = 10_000
_ALL_TIME = -(2**62)
_MATCHING = """replayed_at IS NULL AND (ARRAY_LENGTH(@reasons) = 0 OR reason IN UNNEST(@reasons))
    AND received_at >= TIMESTAMP_MICROS(@since)"""
_NO_CUTOFF = 2**62
KEY_EXPRESSIONS = {
    "visits": "visit_id",
    "events": "event_id",
    "purchase_items": "CONCAT(event_id, ':', CAST(item_index AS STRING))",
    "dead_letter": "dead_letter_id",
}
"""Each table's key as one string, as ``rows.ROW_IDS`` writes it."""


class BigQueryDeadLetters:
    """The dead letters of one sink's dataset and table names."""

    def __init__(self, client: BigQueryClient, dataset: str, names: dict[str, str]) -> None:
        self.client = client
        self.dataset = dataset
        self.names = names

    def _table(self, name: str) -> str:
        return f"`{self.dataset}.{self.names[name]}`"

    def _parameters(self, query: DeadLetterQuery, **more: int) -> dict[str, Any]:
        since = query.since_us if query.since_us is not None else _ALL_TIME
        return {"reasons": list(query.reasons), "since": since, **more}

    async def groups(self, query: DeadLetterQuery) -> list[DeadLetterGroup]:
        rows = await self.client.query(
            f"""SELECT reason, source, COUNT(*) AS n, UNIX_MICROS(MIN(received_at)) AS first,
                       UNIX_MICROS(MAX(received_at)) AS last, ANY_VALUE(message_id) AS message_id,
                       ANY_VALUE(error) AS error
                FROM {self._table("dead_letter")} WHERE {_MATCHING}
                GROUP BY reason, source ORDER BY n DESC, reason, source""",
            self._parameters(query),
        )
        return [
            DeadLetterGroup(r["reason"], r["source"], int(r["n"]), int(r["first"]), int(r["last"]),
                            r["message_id"], r["error"])
            for r in rows
        ]  # fmt: skip

    async def letters(self, query: DeadLetterQuery) -> AsyncIterator[DeadLetterPage]:
        """One query, read a page of its results at a time (``PAGE_ROWS``, and the API's 10 MB)."""
        until = await self._buffer_cutoff()
        held_back = 0
        if until < _NO_CUTOFF:
            held = await self.client.query(
                f"""SELECT COUNT(*) AS n FROM {self._table("dead_letter")}
                    WHERE {_MATCHING} AND received_at >= TIMESTAMP_MICROS(@until)""",
                self._parameters(query, until=until),
            )
            held_back = int(held[0]["n"])
        if query.until_us is not None:
            until = min(until, query.until_us)
        pages = self.client.query_pages(
            f"""SELECT dead_letter_id, UNIX_MICROS(received_at) AS received, source, message_id, event_index,
                       reason, payload, payload_encoding, payload_bytes
                FROM {self._table("dead_letter")} WHERE {_MATCHING} AND received_at < TIMESTAMP_MICROS(@until)
                ORDER BY received_at, dead_letter_id""",
            self._parameters(query, until=until),
            max_rows=PAGE_ROWS,
        )
        async for rows in pages:
            letters = [
                StoredDeadLetter.from_stored(
                    r["dead_letter_id"], int(r["received"]), r["source"], r["message_id"], _int(r["event_index"]),
                    r["reason"], r["payload"], r["payload_encoding"], _int(r["payload_bytes"]),
                )
                for r in rows
            ]  # fmt: skip
            if letters or held_back:
                yield DeadLetterPage(letters, held_back)
                held_back = 0

    async def _buffer_cutoff(self) -> int:
        """Dead letters received from this time on may still be in the streaming buffer."""
        table = await self.client.get_table(self.dataset, self.names["dead_letter"])
        oldest = table.get("streamingBuffer", {}).get("oldestEntryTime")
        return int(oldest) * 1000 - BUFFER_MARGIN_US if oldest else _NO_CUTOFF

    async def visit_contexts(self, visit_ids: list[str]) -> dict[str, VisitContext]:
        contexts: dict[str, VisitContext] = {}
        for start in range(0, len(visit_ids), IDS_PER_QUERY):
            rows = await self.client.query(
                f"""SELECT visit_id, session_id, user_id, device_type FROM {self._table("visits")}
                    WHERE visit_id IN UNNEST(@ids)""",
                {"ids": visit_ids[start : start + IDS_PER_QUERY]},
            )
            contexts.update(
                {r["visit_id"]: VisitContext(r["session_id"], r["user_id"], r["device_type"]) for r in rows}
            )
        return contexts

    async def new_rows(self, rows: RowBatch) -> RowBatch:
        """The rows whose keys are not stored yet."""
        new = RowBatch()
        for name, table_rows in rows.tables.items():
            key_of = ROW_IDS[name]
            keys = [key_of(row) for row in table_rows]
            stored: set[str] = set()
            for start in range(0, len(keys), IDS_PER_QUERY):
                found = await self.client.query(
                    f"""SELECT {KEY_EXPRESSIONS[name]} AS k FROM {self._table(name)}
                        WHERE {KEY_EXPRESSIONS[name]} IN UNNEST(@keys)""",
                    {"keys": keys[start : start + IDS_PER_QUERY]},
                )
                stored.update(r["k"] for r in found)
            new.tables[name] = [row for row, key in zip(table_rows, keys, strict=True) if key not in stored]
        return new

    async def mark(self, dead_letter_ids: list[str], at_us: int) -> None:
        for start in range(0, len(dead_letter_ids), IDS_PER_QUERY):
            await self.client.query(
                f"""UPDATE {self._table("dead_letter")} SET replayed_at = TIMESTAMP_MICROS(@at)
                    WHERE dead_letter_id IN UNNEST(@ids)""",
                {"at": at_us, "ids": dead_letter_ids[start : start + IDS_PER_QUERY]},
            )


def _int(value: str | None) -> int | None:
    return int(value) if value is not None else None
