"""Typed decoding of well-formed visits: the parser's fast path.

msgspec decodes and type-checks a clean visit in one C pass, several times
faster than decoding to dicts and checking fields in Python. Anything these
types do not accept (a wrong type, an unknown event type, a wrapper with extra
keys) is not an error here: the parser falls back to its reference rules, which
decide what is rejected and why. A test checks that both paths agree.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]

REPEATED_CHARS = 256
"""The longest ``session_id``, ``user_id``, ``device_type`` or ``order_id``: each is repeated in
every row of its visit (or purchase), so a long one multiplied a message many times over (a 390
KB visit of 2,000 events with a 200 KB ``session_id`` made 400 MB of rows). A longer one goes to
the reference rules, which reject it as ``field_too_long``."""
Repeated = Annotated[str, msgspec.Meta(max_length=REPEATED_CHARS)]

SHARED_URL_CHARS = 4096
"""The longest page URL the fast path takes, and so the parser's cache of URLs holds between
batches (a longer one, which only a broken or hostile client sends, goes to the reference rules
and is not cached): 65,536 cached URLs of a megabyte each would be 64 GB."""


class PageViewDetails(msgspec.Struct, gc=False):
    page_url: Annotated[str, msgspec.Meta(max_length=SHARED_URL_CHARS)]
    referrer_url: str | None = None


class Product(msgspec.Struct, gc=False):
    product_id: str
    product_name: str | None = None
    category: str | None = None
    price: float | None = None
    quantity: Int64 | None = None


class PurchaseDetails(msgspec.Struct, gc=False):
    order_id: Repeated
    amount: float | None = None
    currency: str | None = None
    items: list[Product] = msgspec.field(default_factory=list)


class PageView(msgspec.Struct, gc=False, tag_field="event_type", tag="page_view"):
    timestamp: str
    details: PageViewDetails


class AddItemToCart(msgspec.Struct, gc=False, tag_field="event_type", tag="add_item_to_cart"):
    timestamp: str
    details: Product


class Purchase(msgspec.Struct, gc=False, tag_field="event_type", tag="purchase"):
    timestamp: str
    details: PurchaseDetails


Event = PageView | AddItemToCart | Purchase


class WrappedEvent(msgspec.Struct, gc=False, forbid_unknown_fields=True):
    """The real export's ``{"event": {...}}``; extra keys go to the reference rules."""

    event: Event


class _VisitFields(msgspec.Struct, gc=False):
    session_id: Repeated
    user_id: Repeated | None = None
    device_type: Repeated | None = None
    geolocation: str | None = None
    user_agent: str | None = None


class WrappedVisit(_VisitFields):
    events: list[WrappedEvent] = msgspec.field(default_factory=list)


class BareVisit(_VisitFields):
    events: list[Event] = msgspec.field(default_factory=list)


wrapped_decoder = msgspec.json.Decoder(WrappedVisit)
bare_decoder = msgspec.json.Decoder(BareVisit)
