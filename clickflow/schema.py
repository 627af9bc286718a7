"""The analytic tables: one definition that every sink creates and writes.

Rows travel through the pipeline as plain tuples in column order, which is the
cheapest shape to build in the parser and to transpose into columns in a sink.
Timestamps are integers (microseconds since the Unix epoch, UTC) for the same
reason; sinks convert them to their own type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

ColumnType = Literal["STRING", "INT64", "FLOAT64", "TIMESTAMP"]


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: ColumnType
    required: bool = False
    description: str = ""


@dataclass(frozen=True, slots=True)
class Table:
    name: str
    columns: tuple[Column, ...]
    key: tuple[str, ...]
    """Columns that identify a row; sinks use them to drop redeliveries."""
    partition_by: str
    """TIMESTAMP column whose day partitions the table in BigQuery."""
    cluster_by: tuple[str, ...] = field(default=())
    description: str = ""

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns)

    def index(self, column: str) -> int:
        return self.column_names.index(column)


def _c(name: str, type_: ColumnType, required: bool = False, description: str = "") -> Column:
    return Column(name, type_, required, description)


VISITS = Table(
    name="visits",
    description="One row per accepted visit message.",
    columns=(
        _c("visit_id", "STRING", True, "Deterministic id derived from the message id."),
        _c("session_id", "STRING", True),
        _c("user_id", "STRING"),
        _c("device_type", "STRING"),
        _c("latitude", "FLOAT64"),
        _c("longitude", "FLOAT64"),
        _c("user_agent", "STRING"),
        _c("visit_start", "TIMESTAMP", description="Earliest accepted event time."),
        _c("visit_end", "TIMESTAMP", description="Latest accepted event time."),
        _c("event_count", "INT64", True, "Accepted events."),
        _c("rejected_event_count", "INT64", True, "Events sent to dead_letter."),
        _c("source", "STRING", True, "Name of the pipeline source."),
        _c("message_id", "STRING", True),
        _c("ingested_at", "TIMESTAMP", True),
    ),
    key=("visit_id",),
    partition_by="visit_start",
    cluster_by=("device_type",),
)

EVENTS = Table(
    name="events",
    description="One row per accepted event.",
    columns=(
        _c("event_id", "STRING", True),
        _c("visit_id", "STRING", True),
        _c("session_id", "STRING", True),
        _c("user_id", "STRING"),
        _c("device_type", "STRING"),
        _c("event_index", "INT64", True, "Position in the visit's events array."),
        _c("event_type", "STRING", True),
        _c("event_timestamp", "TIMESTAMP", True),
        _c("page_url", "STRING"),
        _c("referrer_url", "STRING"),
        _c("product_id", "STRING"),
        _c("product_name", "STRING"),
        _c("category", "STRING"),
        _c("price", "FLOAT64"),
        _c("quantity", "INT64"),
        _c("order_id", "STRING"),
        _c("amount", "FLOAT64"),
        _c("currency", "STRING"),
        _c("ingested_at", "TIMESTAMP", True),
    ),
    key=("event_id",),
    partition_by="event_timestamp",
    cluster_by=("event_type", "page_url"),
)

PURCHASE_ITEMS = Table(
    name="purchase_items",
    description="One row per item of an accepted purchase event.",
    columns=(
        _c("event_id", "STRING", True),
        _c("item_index", "INT64", True),
        _c("visit_id", "STRING", True),
        _c("order_id", "STRING", True),
        _c("session_id", "STRING", True),
        _c("product_id", "STRING", True),
        _c("product_name", "STRING"),
        _c("category", "STRING"),
        _c("price", "FLOAT64"),
        _c("quantity", "INT64"),
        _c("event_timestamp", "TIMESTAMP", True),
        _c("ingested_at", "TIMESTAMP", True),
    ),
    key=("event_id", "item_index"),
    partition_by="event_timestamp",
    cluster_by=("category", "product_id"),
)

DEAD_LETTER = Table(
    name="dead_letter",
    description="One row per rejected message or event, with the reason.",
    columns=(
        _c("dead_letter_id", "STRING", True),
        _c("received_at", "TIMESTAMP", True),
        _c("source", "STRING", True),
        _c("message_id", "STRING", True),
        _c("event_index", "INT64", description="NULL when the whole message was rejected."),
        _c("reason", "STRING", True, "Short machine code, e.g. invalid_json."),
        _c("error", "STRING", True, "Human-readable explanation."),
        _c("payload", "STRING", True, "The raw message, or the rejected event as JSON."),
        _c("payload_encoding", "STRING", True, "'utf-8', or 'base64' for bytes that are not UTF-8 or over 1 MiB."),
    ),
    key=("dead_letter_id",),
    partition_by="received_at",
    cluster_by=("reason",),
)

TABLES: dict[str, Table] = {t.name: t for t in (VISITS, EVENTS, PURCHASE_ITEMS, DEAD_LETTER)}
TABLE_NAMES: tuple[str, ...] = tuple(TABLES)
