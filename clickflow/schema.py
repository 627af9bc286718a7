"""The analytic tables: one definition that every sink creates and writes.

Rows travel through the pipeline as plain tuples in column order, which is the
cheapest shape to build in the parser and to transpose into columns in a sink.
Timestamps are integers (microseconds since the Unix epoch, UTC) for the same
reason; sinks convert them to their own type.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum
from typing import Literal

ColumnType = Literal["STRING", "INT64", "FLOAT64", "TIMESTAMP"]


class VisitCol(IntEnum):
    """Positions of the ``visits`` columns in a row tuple."""

    visit_id = 0
    session_id = 1
    user_id = 2
    device_type = 3
    latitude = 4
    longitude = 5
    user_agent = 6
    visit_start = 7
    visit_end = 8
    event_count = 9
    rejected_event_count = 10
    source = 11
    message_id = 12
    ingested_at = 13


class EventCol(IntEnum):
    """Positions of the ``events`` columns in a row tuple."""

    event_id = 0
    visit_id = 1
    session_id = 2
    user_id = 3
    device_type = 4
    event_index = 5
    event_type = 6
    event_timestamp = 7
    page_url = 8
    referrer_url = 9
    product_id = 10
    product_name = 11
    category = 12
    price = 13
    quantity = 14
    order_id = 15
    amount = 16
    currency = 17
    ingested_at = 18


class ItemCol(IntEnum):
    """Positions of the ``purchase_items`` columns in a row tuple."""

    event_id = 0
    item_index = 1
    visit_id = 2
    order_id = 3
    session_id = 4
    product_id = 5
    product_name = 6
    category = 7
    price = 8
    quantity = 9
    event_timestamp = 10
    ingested_at = 11


class DeadLetterCol(IntEnum):
    """Positions of the ``dead_letter`` columns in a row tuple."""

    dead_letter_id = 0
    received_at = 1
    source = 2
    message_id = 3
    event_index = 4
    reason = 5
    error = 6
    payload = 7
    payload_encoding = 8
    payload_bytes = 9
    parser_version = 10
    replayed_at = 11


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: ColumnType
    required: bool = False
    description: str = ""
    position: int = -1
    """Where the column is in a row tuple (``VisitCol`` and the like)."""


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

    def __post_init__(self) -> None:
        positions = [(c.position, c.name) for c in self.columns]
        if positions != list(enumerate(self.column_names)):
            raise ValueError(f"{self.name}: columns out of their positions: {positions}")

    def index(self, column: str) -> int:
        return self.column_names.index(column)


def _c(column: IntEnum, type_: ColumnType, required: bool = False, description: str = "") -> Column:
    return Column(column.name, type_, required, description, int(column))


VISITS = Table(
    name="visits",
    description="One row per accepted visit message.",
    columns=(
        _c(VisitCol.visit_id, "STRING", True, "Deterministic id derived from the message id."),
        _c(VisitCol.session_id, "STRING", True),
        _c(VisitCol.user_id, "STRING"),
        _c(VisitCol.device_type, "STRING"),
        _c(VisitCol.latitude, "FLOAT64"),
        _c(VisitCol.longitude, "FLOAT64"),
        _c(VisitCol.user_agent, "STRING"),
        _c(VisitCol.visit_start, "TIMESTAMP", description="Earliest accepted event time."),
        _c(VisitCol.visit_end, "TIMESTAMP", description="Latest accepted event time."),
        _c(VisitCol.event_count, "INT64", True, "Accepted events."),
        _c(VisitCol.rejected_event_count, "INT64", True, "Events sent to dead_letter."),
        _c(VisitCol.source, "STRING", True, "Name of the pipeline source."),
        _c(VisitCol.message_id, "STRING", True),
        _c(VisitCol.ingested_at, "TIMESTAMP", True),
    ),
    key=("visit_id",),
    partition_by="visit_start",
    cluster_by=("device_type",),
)

EVENTS = Table(
    name="events",
    description="One row per accepted event.",
    columns=(
        _c(EventCol.event_id, "STRING", True),
        _c(EventCol.visit_id, "STRING", True),
        _c(EventCol.session_id, "STRING", True),
        _c(EventCol.user_id, "STRING"),
        _c(EventCol.device_type, "STRING"),
        _c(EventCol.event_index, "INT64", True, "Position in the visit's events array."),
        _c(EventCol.event_type, "STRING", True),
        _c(EventCol.event_timestamp, "TIMESTAMP", True),
        _c(EventCol.page_url, "STRING"),
        _c(EventCol.referrer_url, "STRING"),
        _c(EventCol.product_id, "STRING"),
        _c(EventCol.product_name, "STRING"),
        _c(EventCol.category, "STRING"),
        _c(EventCol.price, "FLOAT64"),
        _c(EventCol.quantity, "INT64"),
        _c(EventCol.order_id, "STRING"),
        _c(EventCol.amount, "FLOAT64"),
        _c(EventCol.currency, "STRING"),
        _c(EventCol.ingested_at, "TIMESTAMP", True),
    ),
    key=("event_id",),
    partition_by="event_timestamp",
    cluster_by=("event_type", "page_url"),
)

PURCHASE_ITEMS = Table(
    name="purchase_items",
    description="One row per item of an accepted purchase event.",
    columns=(
        _c(ItemCol.event_id, "STRING", True),
        _c(ItemCol.item_index, "INT64", True),
        _c(ItemCol.visit_id, "STRING", True),
        _c(ItemCol.order_id, "STRING", True),
        _c(ItemCol.session_id, "STRING", True),
        _c(ItemCol.product_id, "STRING", True),
        _c(ItemCol.product_name, "STRING"),
        _c(ItemCol.category, "STRING"),
        _c(ItemCol.price, "FLOAT64"),
        _c(ItemCol.quantity, "INT64"),
        _c(ItemCol.event_timestamp, "TIMESTAMP", True),
        _c(ItemCol.ingested_at, "TIMESTAMP", True),
    ),
    key=("event_id", "item_index"),
    partition_by="event_timestamp",
    cluster_by=("category", "product_id"),
)

DEAD_LETTER = Table(
    name="dead_letter",
    description="One row per rejected message or event, with the reason.",
    columns=(
        _c(DeadLetterCol.dead_letter_id, "STRING", True),
        _c(DeadLetterCol.received_at, "TIMESTAMP", True),
        _c(DeadLetterCol.source, "STRING", True),
        _c(DeadLetterCol.message_id, "STRING", True),
        _c(DeadLetterCol.event_index, "INT64", description="NULL when the whole message was rejected."),
        _c(DeadLetterCol.reason, "STRING", True, "Short machine code, e.g. invalid_json."),
        _c(DeadLetterCol.error, "STRING", True, "Human-readable explanation."),
        _c(DeadLetterCol.payload, "STRING", True, "The raw message, or the rejected event as JSON."),
        _c(
            DeadLetterCol.payload_encoding,
            "STRING",
            True,
            "'utf-8', or 'base64' for bytes that are not UTF-8 or over 1 MiB.",
        ),
        _c(DeadLetterCol.payload_bytes, "INT64", description="Size of the original; larger: only a head is kept."),
        _c(DeadLetterCol.parser_version, "STRING", description="The parser rules that rejected it (PARSER_VERSION)."),
        _c(DeadLetterCol.replayed_at, "TIMESTAMP", description="When `clickflow dlq replay` stored what it parses to."),
    ),
    key=("dead_letter_id",),
    partition_by="received_at",
    cluster_by=("reason",),
)

TABLES: dict[str, Table] = {t.name: t for t in (VISITS, EVENTS, PURCHASE_ITEMS, DEAD_LETTER)}
TABLE_NAMES: tuple[str, ...] = tuple(TABLES)
