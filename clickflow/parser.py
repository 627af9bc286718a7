"""The one shared stage: raw visit messages become rows and dead letters.

Every message yields either a ``visits`` row or a message-level dead letter, and
every element of its ``events`` array yields either an ``events`` row or an
event-level dead letter. Nothing raises and nothing is dropped. The rules are
listed in ARCHITECTURE.md; the reason codes, and the dead letters' rows, are
``clickflow.rejections``'.

Clean visits take a typed fast path (``clickflow.fastpath``); anything it does
not accept is decided by the reference rules in ``_reference``, which apply ``clickflow.rules``
to each value. Rows are plain tuples in the schema's column order (see ``clickflow.schema``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec

from clickflow import fastpath, rules
from clickflow.api import Message, RowBatch
from clickflow.fastpath import REPEATED_CHARS, AddItemToCart, PageView, Purchase, WrappedVisit
from clickflow.rejections import (
    KEPT,
    OVERSIZED_PAYLOAD_BYTES,
    REASON_FIELD_TOO_LONG,
    REASON_INVALID_AMOUNT,
    REASON_INVALID_DETAILS,
    REASON_INVALID_EVENT,
    REASON_INVALID_EVENTS,
    REASON_INVALID_ITEMS,
    REASON_INVALID_JSON,
    REASON_INVALID_SESSION_ID,
    REASON_INVALID_TIMESTAMP,
    REASON_INVALID_UTF8,
    REASON_MISSING_ORDER_ID,
    REASON_MISSING_PAGE_URL,
    REASON_NOT_AN_OBJECT,
    REASON_TOO_DEEP,
    REASON_TOO_LARGE,
    REASON_TOO_MANY_INVALID_EVENTS,
    REASON_TOO_MANY_ROWS,
    REASON_UNKNOWN_EVENT_TYPE,
    REASON_UNWRITABLE,
    EventRejected,
    Row,
    event_dead_letter,
    kept_head,
    kept_text,
    message_dead_letter,
)

MAX_INVALID_EVENTS = 1000
"""The most events of one visit rejected one by one: each is a dead letter of its own, about 190
bytes for an event as small as ``{}``, so a 1 MB message of them made 62 MB of rows (at 10 MB, 1.7
GB of memory for one message). A visit with more is rejected whole, its message kept."""

MAX_ROWS = 50_000
"""The most events and purchase items one visit may carry, together: each is a row of its own,
which repeats the visit's ids, so small ones multiply a message. Four push requests at once, each
a 10 MB message of 550,000 purchase items of 18 bytes, took a pipeline into ``bigquery_streaming``
to 1.13 GB (1.59 GB with ids of 256 characters), past Cloud Run's 1 GiB; rejected, 449 MB (426).
A visit with more is rejected whole (``too_many_rows``), its message kept."""

EVENT_TYPES = frozenset({"page_view", "add_item_to_cart", "purchase"})
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
_TIMESTAMP_CACHE_SIZE = 65_536
_PAGE_URL_CACHE_SIZE = 65_536
_CACHED_TIMESTAMP_CHARS = 64
"""The longest timestamp text cached (ISO-8601 needs 35 at most, but a fraction may run on): the
caches hold texts between batches, so a stream of long ones must not keep them alive."""
_NO_EVENTS: list[Any] = []  # a missing "events" is a visit without events; never mutated
_json_decode = msgspec.json.decode
_astuple = msgspec.structs.astuple
_INDEX_TEXT_SIZE = 256
_INDEX_TEXT = tuple(str(i) for i in range(_INDEX_TEXT_SIZE))  # "12" without formatting per event
MAX_MESSAGE_BYTES = 10 * 1024 * 1024
"""Pub/Sub's own limit for one message; a larger one becomes a ``too_large`` dead letter."""

MAX_MESSAGE_ID_CHARS = 8192
"""The longest message id kept as it is: a file's path and line fit, and so does the longest HTTP
header aiohttp takes. The id is in its visit's row and in each of its dead letters (up to
``MAX_INVALID_EVENTS`` and one more), so a push request of 1.1 MB with a 1 MB ``messageId`` made a
gigabyte of rows. A longer one is replaced by ``sha256:`` and 32 hex digits of it (``bounded``),
the same for every delivery of the message."""


def bounded(message: Message) -> Message:
    """``message``, with a digest of its id if that is over ``MAX_MESSAGE_ID_CHARS``."""
    message_id = message.message_id
    if len(message_id) <= MAX_MESSAGE_ID_CHARS:
        return message
    digest = hashlib.sha256(message_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    return Message(message.data, f"sha256:{digest}")


def visit_id_for(message_id: str) -> str:
    """The deterministic id of a visit: every delivery of a message shares it."""
    return hashlib.blake2b(message_id.encode(), digest_size=16).hexdigest()


def parse_timestamp_us(value: str) -> int:
    """ISO-8601 text to microseconds since the epoch; a time without a zone is UTC."""
    dt = datetime.fromisoformat(value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (dt - _EPOCH) // _MICROSECOND


def geolocation(value: Any) -> tuple[float | None, float | None]:
    """``"lat,lon"`` to floats; anything else (or out of range) is (None, None)."""
    if type(value) is not str:
        return None, None
    lat_text, sep, lon_text = value.partition(",")
    try:
        lat, lon = float(lat_text), float(lon_text)
    except ValueError:
        return None, None
    if sep and -90.0 <= lat <= 90.0 and -180.0 <= lon <= 180.0:
        return lat, lon
    return None, None


def _valid_utf8(data: bytes) -> bool:
    """msgspec's typed decoders skip unknown keys without checking their encoding; this does."""
    if data.isascii():
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class VisitParser:
    """Turns batches of raw messages into rows. Keep one per pipeline: it caches."""

    def __init__(self, max_message_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_message_bytes = max_message_bytes
        self._timestamps: dict[str, int] = {}
        self._page_urls: dict[str, str] = {}
        """One string object per distinct page URL: a site has few pages, so rows share them, and
        whoever counts by page (the live view) compares and hashes each URL once, not per event.
        Only the fast path's URLs, of ``fastpath.SHARED_URL_CHARS`` at most."""
        # typed decoders, the one that accepted the latest visit first
        self._decoders: tuple[msgspec.json.Decoder[Any], ...] = (fastpath.wrapped_decoder, fastpath.bare_decoder)

    def timestamp_us(self, value: str) -> int | None:
        """Cached ``parse_timestamp_us``; None when the text is not ISO-8601."""
        cached = self._timestamps.get(value)
        if cached is None:
            try:
                cached = parse_timestamp_us(value)
            except ValueError:
                return None
            if len(value) > _CACHED_TIMESTAMP_CHARS:
                return cached
            if len(self._timestamps) >= _TIMESTAMP_CACHE_SIZE:
                self._timestamps.clear()
            self._timestamps[value] = cached
        return cached

    def parse(self, messages: Iterable[Message], source: str, received_at_us: int) -> RowBatch:
        """Rows for a batch. Clean visits are decoded by the typed decoders and turned into rows
        here; anything they refuse, or any event this loop cannot accept, goes to ``_reference``.

        Written for speed: per-batch lookups are hoisted and row tuples are spelled out.
        """
        batch = RowBatch()
        now = received_at_us
        tables = batch.tables
        events, items, add_visit = tables["events"], tables["purchase_items"], tables["visits"].append
        add_event, add_item = events.append, items.append
        cached_timestamp = self._timestamps.get
        if len(self._page_urls) >= _PAGE_URL_CACHE_SIZE:  # a stream of unique URLs
            self._page_urls.clear()
        shared_url = self._page_urls.setdefault
        first, second = self._decoders
        limit = self.max_message_bytes
        for message in messages:
            if len(message.message_id) > MAX_MESSAGE_ID_CHARS:  # not a call a message: 23 ns of a visit's 7 µs
                message = bounded(message)
            visit_id = visit_id_for(message.message_id)
            data = message.data
            visit: fastpath.WrappedVisit | fastpath.BareVisit | None
            if len(data) > limit or not _valid_utf8(data):
                visit = None
            else:
                try:
                    visit = first.decode(data)
                except (msgspec.DecodeError, RecursionError):
                    try:
                        visit = second.decode(data)
                        first, second = second, first  # the stream's format changed; try this one first
                    except (msgspec.DecodeError, RecursionError):
                        visit = None
            if visit is None or not visit.session_id:
                self._reference(message, visit_id, source, now, batch)
                continue
            rows = len(visit.events)
            if rows > MAX_ROWS:
                self._reference(message, visit_id, source, now, batch)
                continue
            session_id, user_id, device = visit.session_id, visit.user_id, visit.device_type
            wrapped = type(visit) is WrappedVisit
            events_before, items_before = len(events), len(items)
            id_prefix = visit_id + ":"
            start = end = 0
            for index, element in enumerate(visit.events):
                event: fastpath.Event = element.event if wrapped else element  # type: ignore[union-attr,assignment]
                ts = cached_timestamp(event.timestamp)
                if ts is None:
                    ts = self.timestamp_us(event.timestamp)
                    if ts is None:
                        break
                event_id = id_prefix + _INDEX_TEXT[index] if index < _INDEX_TEXT_SIZE else f"{id_prefix}{index}"
                if type(event) is PageView:
                    details = event.details
                    add_event((
                        event_id, visit_id, session_id, user_id, device, index, "page_view", ts,
                        shared_url(details.page_url, details.page_url), details.referrer_url or None,
                        None, None, None, None, None, None, None, None, now,
                    ))  # fmt: skip
                elif type(event) is AddItemToCart:
                    product = event.details
                    if not product.product_id:
                        break
                    add_event((
                        event_id, visit_id, session_id, user_id, device, index, "add_item_to_cart", ts,
                        None, None, *_astuple(product), None, None, None, now,
                    ))  # fmt: skip
                elif type(event) is Purchase:
                    purchase = event.details
                    order_id = purchase.order_id
                    rows += len(purchase.items)
                    if not order_id or rows > MAX_ROWS or not all(item.product_id for item in purchase.items):
                        break
                    add_event((
                        event_id, visit_id, session_id, user_id, device, index, "purchase", ts,
                        None, None, None, None, None, None, None, order_id, purchase.amount, purchase.currency, now,
                    ))  # fmt: skip
                    for item_index, item in enumerate(purchase.items):
                        add_item((
                            event_id, item_index, visit_id, order_id, session_id, *_astuple(item), ts, now,
                        ))  # fmt: skip
                if index == 0:  # on this path every event is accepted
                    start = end = ts
                elif ts < start:
                    start = ts
                elif ts > end:
                    end = ts
            else:
                accepted = len(events) - events_before
                lat, lon = geolocation(visit.geolocation)
                add_visit((
                    visit_id, session_id, user_id, device, lat, lon, visit.user_agent,
                    start if accepted else None, end if accepted else None,
                    accepted, 0, source, message.message_id, now,
                ))  # fmt: skip
                continue
            del events[events_before:], items[items_before:]  # leave this visit to the reference rules
            self._reference(message, visit_id, source, now, batch)
        self._decoders = (first, second)
        return batch

    def unwritable(self, message: Message, source: str, received_at_us: int, error: str) -> RowBatch:
        """A message no sink could store, as one ``unwritable`` dead letter (only its head if large)."""
        batch = RowBatch()
        message = bounded(message)
        data = message.data
        if len(data) > OVERSIZED_PAYLOAD_BYTES:
            note, *payload = kept_head(data)
            error += f" (the message is {note}; {KEPT})"
        else:
            payload = list(kept_text(data))
        visit_id = visit_id_for(message.message_id)
        row = message_dead_letter(message, visit_id, received_at_us, source, REASON_UNWRITABLE, error, payload)
        batch.tables["dead_letter"].append(row)
        return batch

    def _reference(self, message: Message, visit_id: str, source: str, now: int, batch: RowBatch) -> None:
        """The rules, applied field by field to an untyped decode; decides every rejection."""
        t = batch.tables
        data, message_id = message.data, message.message_id
        reason = error = ""
        if len(data) > self.max_message_bytes:
            note, *payload = kept_head(data)
            error = f"message is {note}, over the {self.max_message_bytes}-byte limit; {KEPT}"
            t["dead_letter"].append(
                message_dead_letter(message, visit_id, now, source, REASON_TOO_LARGE, error, payload)
            )
            return
        try:
            visit = _json_decode(data)
        except RecursionError:
            reason, error = REASON_TOO_DEEP, "message is nested too deeply to decode"
        except msgspec.DecodeError as exc:
            try:
                data.decode("utf-8")
            except UnicodeDecodeError as uexc:
                reason, error = REASON_INVALID_UTF8, f"message is not valid UTF-8: {uexc}"
            else:
                reason, error = REASON_INVALID_JSON, f"message is not valid JSON: {exc}"
        else:
            if type(visit) is not dict:
                reason, error = REASON_NOT_AN_OBJECT, f"message is JSON {type(visit).__name__}, not an object"
            elif type(visit.get("session_id")) is not str or not visit["session_id"]:
                reason, error = REASON_INVALID_SESSION_ID, "session_id must be a non-empty string"
            elif type(visit.get("events", _NO_EVENTS)) is not list:
                reason, error = REASON_INVALID_EVENTS, "events must be a list"
            else:
                reason, error = rules.repeated_too_long(visit)
        if reason:
            t["dead_letter"].append(message_dead_letter(message, visit_id, now, source, reason, error, kept_text(data)))
            return

        events = visit.get("events", _NO_EVENTS)
        items = sum(map(rules.item_count, events)) if len(events) <= MAX_ROWS else 0
        if len(events) + items > MAX_ROWS:
            carried = f"events ({len(events):,}) and purchase items ({items:,})" if items else f"{len(events):,} events"
            error = f"its {carried} are more than {MAX_ROWS:,} rows"
            t["dead_letter"].append(
                message_dead_letter(message, visit_id, now, source, REASON_TOO_MANY_ROWS, error, kept_text(data))
            )
            return
        session_id, user_id, device = (
            visit["session_id"],
            rules.text(visit.get("user_id")),
            rules.text(visit.get("device_type")),
        )
        start = end = None
        accepted = rejected = 0
        before = {name: len(rows) for name, rows in t.items()}
        for index, element in enumerate(events):
            head = (f"{visit_id}:{index}", visit_id, session_id, user_id, device, index)
            try:
                ts = self._reference_event(element, head, now, t["events"], t["purchase_items"])
            except EventRejected as exc:
                rejected += 1
                if rejected > MAX_INVALID_EVENTS:
                    for name, rows in t.items():
                        del rows[before[name] :]
                    error = f"more than {MAX_INVALID_EVENTS:,} of its {len(events):,} events are invalid"
                    t["dead_letter"].append(message_dead_letter(
                        message, visit_id, now, source, REASON_TOO_MANY_INVALID_EVENTS, error, kept_text(data)
                    ))  # fmt: skip
                    return
                t["dead_letter"].append(event_dead_letter(head, element, exc, source, message_id, now))
                continue
            accepted += 1
            start = ts if start is None else min(start, ts)
            end = ts if end is None else max(end, ts)
        lat, lon = geolocation(visit.get("geolocation"))
        t["visits"].append((
            visit_id, session_id, user_id, device, lat, lon, rules.text(visit.get("user_agent")),
            start, end, accepted, rejected, source, message_id, now,
        ))  # fmt: skip

    def parse_event(
        self, payload: bytes, visit: VisitContext, message_id: str, index: int, source: str, now: int
    ) -> RowBatch:
        """One event of a stored visit, parsed again on its own (``payload`` as a dead letter keeps
        it): its rows, or its dead letter. For ``clickflow dlq replay``."""
        batch = RowBatch()
        visit_id = visit_id_for(message_id)
        head = (f"{visit_id}:{index}", visit_id, visit.session_id, visit.user_id, visit.device_type, index)
        try:
            element = _json_decode(payload)
            self._reference_event(element, head, now, batch.tables["events"], batch.tables["purchase_items"])
        except (msgspec.DecodeError, RecursionError):
            rejected = EventRejected(REASON_INVALID_EVENT, "the stored event is not JSON")
            batch.tables["dead_letter"].append(event_dead_letter(head, None, rejected, source, message_id, now))
        except EventRejected as exc:
            batch.tables["dead_letter"].append(event_dead_letter(head, element, exc, source, message_id, now))
        return batch

    def _reference_event(self, element: Any, head6: Row, now: int, events: list[Row], items: list[Row]) -> int:
        """Append one event's rows and return its timestamp, or raise EventRejected."""
        event = rules.unwrapped(element)
        if type(event) is not dict:
            raise EventRejected(REASON_INVALID_EVENT, f"event is JSON {type(event).__name__}, not an object")
        event_type = event.get("event_type")
        if type(event_type) is not str or event_type not in EVENT_TYPES:
            raise EventRejected(
                REASON_UNKNOWN_EVENT_TYPE, f"event_type {event_type!r} is not one of {', '.join(sorted(EVENT_TYPES))}"
            )
        raw_ts = event.get("timestamp")
        ts = self.timestamp_us(raw_ts) if type(raw_ts) is str else None
        if ts is None:
            raise EventRejected(REASON_INVALID_TIMESTAMP, f"timestamp {raw_ts!r} is not ISO-8601 text")
        details = event.get("details")
        if type(details) is not dict:
            raise EventRejected(REASON_INVALID_DETAILS, "details must be an object")
        head = (*head6, event_type, ts)

        if event_type == "page_view":
            page_url = details.get("page_url")
            if type(page_url) is not str:
                raise EventRejected(REASON_MISSING_PAGE_URL, "page_view needs a string page_url")
            events.append(rules.page_view_row(head, page_url, rules.text(details.get("referrer_url")), now))
        elif event_type == "add_item_to_cart":
            events.append(rules.cart_row(head, rules.product(details, "add_item_to_cart"), now))
        else:
            order_id = details.get("order_id")
            if type(order_id) is not str or not order_id:
                raise EventRejected(REASON_MISSING_ORDER_ID, "purchase needs a non-empty string order_id")
            if len(order_id) > REPEATED_CHARS:
                raise EventRejected(REASON_FIELD_TOO_LONG, rules.too_long("order_id", order_id, "item"))
            amount = rules.number(details.get("amount"), REASON_INVALID_AMOUNT, "amount")
            raw_items = details.get("items", [])
            if type(raw_items) is not list:
                raise EventRejected(REASON_INVALID_ITEMS, "purchase items must be a list")
            products = []
            for item_index, item in enumerate(raw_items):
                if type(item) is not dict:
                    raise EventRejected(REASON_INVALID_ITEMS, f"item {item_index} is not an object")
                try:
                    products.append(rules.product(item, f"item {item_index}"))
                except EventRejected as exc:
                    raise EventRejected(REASON_INVALID_ITEMS, exc.error) from None
            events.append(rules.purchase_row(head, order_id, amount, rules.text(details.get("currency")), now))
            for item_index, product in enumerate(products):
                items.append((*rules.item_row(head, item_index, order_id, product), now))
        return ts


@dataclass(frozen=True, slots=True)
class VisitContext:
    """What an event's rows take from its visit."""

    session_id: str
    user_id: str | None
    device_type: str | None
