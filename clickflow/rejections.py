"""What the parser rejects, and how: reason codes, rejected payloads kept as text, and the
``dead_letter`` rows made of them (columns as ``clickflow.schema`` orders them).

The rules that reject are ``clickflow.parser``'s; ARCHITECTURE.md lists them with their reasons.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from typing import Any

import msgspec

from clickflow.api import Message
from clickflow.schema import EventCol

REASON_TOO_LARGE = "too_large"
REASON_INVALID_UTF8 = "invalid_utf8"
REASON_INVALID_JSON = "invalid_json"
REASON_TOO_DEEP = "too_deep"
REASON_UNWRITABLE = "unwritable"
REASON_NOT_AN_OBJECT = "not_an_object"
REASON_INVALID_SESSION_ID = "invalid_session_id"
REASON_INVALID_EVENTS = "invalid_events"
REASON_INVALID_EVENT = "invalid_event"
REASON_UNKNOWN_EVENT_TYPE = "unknown_event_type"
REASON_INVALID_TIMESTAMP = "invalid_timestamp"
REASON_INVALID_DETAILS = "invalid_details"
REASON_MISSING_PAGE_URL = "missing_page_url"
REASON_MISSING_PRODUCT_ID = "missing_product_id"
REASON_INVALID_PRICE = "invalid_price"
REASON_INVALID_QUANTITY = "invalid_quantity"
REASON_MISSING_ORDER_ID = "missing_order_id"
REASON_INVALID_AMOUNT = "invalid_amount"
REASON_INVALID_ITEMS = "invalid_items"
REASON_FIELD_TOO_LONG = "field_too_long"
REASON_TOO_MANY_INVALID_EVENTS = "too_many_invalid_events"
REASON_TOO_MANY_ROWS = "too_many_rows"

PARSER_VERSION = "3"
"""The version of the parser's rules, stored with each dead letter. Raise it when a rule changes, so a
replay (``clickflow dlq replay``) can tell which rules rejected what."""
TEXT_PAYLOAD_BYTES = 1024 * 1024
"""A larger rejected payload is kept in base64, whose length is 4/3 of the bytes whatever they are."""
OVERSIZED_PAYLOAD_BYTES = 64 * 1024
"""How much of an oversized message its dead letter keeps (with its size and SHA-256)."""

Row = tuple[Any, ...]
_json_encode = msgspec.json.encode


class EventRejected(Exception):
    """Internal signal: this event goes to dead_letter with ``reason``."""

    def __init__(self, reason: str, error: str) -> None:
        super().__init__(error)
        self.reason = reason
        self.error = error


def kept_text(data: bytes) -> tuple[str, str]:
    """A rejected message as text: UTF-8 as it is, or base64 when it is not UTF-8 or is so large
    that JSON escaping could make its row too long for a sink (DuckDB reads rows of up to 16 MB)."""
    if len(data) <= TEXT_PAYLOAD_BYTES:
        try:
            return data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            pass
    return base64.b64encode(data).decode("ascii"), "base64"


def kept_head(data: bytes) -> tuple[str, str, str]:
    """For a large message: its size and SHA-256 with what is kept, and the kept first bytes."""
    note = f"{len(data)} bytes (sha256 {hashlib.sha256(data).hexdigest()})"
    return note, *kept_text(data[:OVERSIZED_PAYLOAD_BYTES])


KEPT = f"the payload holds its first {OVERSIZED_PAYLOAD_BYTES} bytes"


def message_dead_letter(
    message: Message, visit_id: str, now: int, source: str, reason: str, error: str, kept: Sequence[str]
) -> Row:
    """A whole message's dead letter; ``kept`` is the payload as stored and its encoding."""
    return (
        visit_id,
        now,
        source,
        message.message_id,
        None,
        reason,
        error,
        *kept,
        len(message.data),
        PARSER_VERSION,
        None,
    )


def event_dead_letter(head: Row, element: Any, exc: EventRejected, source: str, message_id: str, now: int) -> Row:
    index = head[EventCol.event_index]
    payload = _json_encode(element)
    return (
        head[EventCol.event_id], now, source, message_id, index, exc.reason, f"event {index}: {exc.error}",
        payload.decode(), "utf-8", len(payload), PARSER_VERSION, None,
    )  # fmt: skip
