"""The reference rules one value at a time: what a field of a visit, an event or a purchase item
must be to be stored, and the rows made of those that pass. ``parser.VisitParser._reference``
applies them to an untyped decode, for whatever the typed fast path (``fastpath``) refuses.
"""

from __future__ import annotations

from typing import Any

from clickflow.fastpath import REPEATED_CHARS
from clickflow.rejections import (
    REASON_FIELD_TOO_LONG,
    REASON_INVALID_PRICE,
    REASON_INVALID_QUANTITY,
    REASON_MISSING_PRODUCT_ID,
    EventRejected,
    Row,
)
from clickflow.schema import EventCol

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

Product = tuple[str, str | None, str | None, float | None, int | None]


# Row builders; ``head`` is the first eight events columns.
def page_view_row(head: Row, page_url: str, referrer: str | None, now: int) -> Row:
    return (*head, page_url, referrer or None, None, None, None, None, None, None, None, None, now)


def cart_row(head: Row, product: Product, now: int) -> Row:
    return (*head, None, None, *product, None, None, None, now)


def purchase_row(head: Row, order_id: str, amount: float | None, currency: Any, now: int) -> Row:
    return (*head, None, None, None, None, None, None, None, order_id, amount, currency, now)


def item_row(head: Row, index: int, order_id: str, product: Product) -> Row:
    event_id, visit_id, session_id = head[EventCol.event_id], head[EventCol.visit_id], head[EventCol.session_id]
    return (event_id, index, visit_id, order_id, session_id, *product, head[EventCol.event_timestamp])


def text(value: Any) -> str | None:
    return value if type(value) is str else None


def repeated_too_long(visit: dict[str, Any]) -> tuple[str, str]:
    """``field_too_long`` for a visit whose field repeated in each of its rows is over
    ``REPEATED_CHARS`` (see ``fastpath``); else no reason."""
    for field in ("session_id", "user_id", "device_type"):
        value = visit.get(field)
        if type(value) is str and len(value) > REPEATED_CHARS:
            return REASON_FIELD_TOO_LONG, too_long(field, value, "row")
    return "", ""


def too_long(field: str, value: str, rows: str) -> str:
    return f"{field} is {len(value):,} characters, over {REPEATED_CHARS}: each of its {rows}s would repeat it"


def unwrapped(element: Any) -> Any:
    """An element of ``events`` as its event: ``{"event": {...}}`` unwrapped, anything else as it is."""
    if type(element) is dict and "event_type" not in element and "event" in element:
        return element["event"]
    return element


def item_count(element: Any) -> int:
    """How many purchase items an event of the reference rules carries (0 if it is not a purchase
    with a list of them), valid or not: what ``MAX_ROWS`` counts."""
    event = unwrapped(element)
    if type(event) is not dict or event.get("event_type") != "purchase":
        return 0
    details = event.get("details")
    items = details.get("items") if type(details) is dict else None
    return len(items) if type(items) is list else 0


def number(value: Any, reason: str, field: str) -> float | None:
    if value is None:
        return None
    if type(value) is float or type(value) is int:
        try:
            return float(value)
        except OverflowError:
            pass
    raise EventRejected(reason, f"{field} must be a number, got {value!r}")


def product(details: dict[str, Any], where: str) -> Product:
    """Product fields shared by cart events and purchase items."""
    product_id = details.get("product_id")
    if type(product_id) is not str or not product_id:
        raise EventRejected(REASON_MISSING_PRODUCT_ID, f"{where}: product_id must be a non-empty string")
    price = number(details.get("price"), REASON_INVALID_PRICE, f"{where}: price")
    quantity = details.get("quantity")
    if quantity is not None and not (type(quantity) is int and _INT64_MIN <= quantity <= _INT64_MAX):
        raise EventRejected(REASON_INVALID_QUANTITY, f"{where}: quantity must be an integer, got {quantity!r}")
    return product_id, text(details.get("product_name")), text(details.get("category")), price, quantity
