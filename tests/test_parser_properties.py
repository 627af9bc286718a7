"""Property-based checks of the parser: it never raises, never drops, and both paths agree."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clickflow.api import Message, RowBatch
from clickflow.parser import VisitParser

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
timestamps = st.sampled_from([
    "2024-07-01T09:00:00", "2024-07-01T09:00:00Z", "2024-07-01T09:00:00.5+02:00", "2024-07-01", "soon", "",
]) | json_scalars  # fmt: skip
numbers = st.sampled_from([1, 2.5, 0, -3, 2**63, 2**63 - 1, True, "1", None, 1e300]) | json_scalars


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Either a value for the key, or the key left out."""
    return st.one_of(st.just(_OMIT), strategy)


_OMIT = object()


def _dict(**fields: Any) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not _OMIT}


products = st.builds(
    _dict,
    product_id=maybe(st.sampled_from(["P-1", "", None, 7])),
    product_name=maybe(st.sampled_from(["Mouse", None, 3])),
    category=maybe(st.sampled_from(["hardware", None, []])),
    price=maybe(numbers),
    quantity=maybe(numbers),
    extra=maybe(json_values),
)
details = st.one_of(
    st.builds(_dict, page_url=maybe(st.sampled_from(["https://e.com/a", "", 5, None, "h" * 4096, "h" * 4097])),
              referrer_url=maybe(st.sampled_from(["https://g.com", "", None, 1]))),
    products,
    st.builds(_dict, order_id=maybe(st.sampled_from(["O-1", "", None, "O" * 256, "O" * 257])), amount=maybe(numbers),
              currency=maybe(st.sampled_from(["USD", None, 1])),
              items=maybe(st.lists(products, max_size=3) | json_values)),
    json_values,
)  # fmt: skip
events = st.builds(
    _dict,
    event_type=maybe(st.sampled_from(["page_view", "add_item_to_cart", "purchase", "hover", None])),
    timestamp=maybe(timestamps),
    details=maybe(details),
)
elements = st.one_of(events, events.map(lambda e: {"event": e}), json_values)
visits = st.builds(
    _dict,
    session_id=maybe(st.sampled_from(["SID-1", "", None, 12, "S" * 256, "S" * 257])),
    user_id=maybe(st.sampled_from(["UID-1", None, 3, "U" * 257])),
    device_type=maybe(st.sampled_from(["mobile", None, True, "d" * 256, "d" * 257])),
    geolocation=maybe(st.sampled_from(["1.5,2.5", "x", None, "100,1"])),
    user_agent=maybe(st.sampled_from(["Mozilla", None])),
    events=maybe(st.lists(elements, max_size=4) | json_values),
)
valid_products = st.builds(
    dict,
    product_id=st.sampled_from(["P-1", "P-2"]),
    product_name=st.sampled_from(["Mouse", "Pad"]),
    category=st.just("peripherals"),
    price=st.sampled_from([9.99, 10, 0.5]),
    quantity=st.integers(1, 3),
)
valid_events = st.one_of(
    st.builds(dict, event_type=st.just("page_view"), timestamp=st.sampled_from(["2024-07-01T09:00:00", "2024-07-01"]),
              details=st.builds(_dict, page_url=st.just("https://e.com/a"),
                                referrer_url=maybe(st.sampled_from(["https://g.com", "", None])))),
    st.builds(dict, event_type=st.just("add_item_to_cart"), timestamp=st.just("2024-07-01T09:00:00Z"),
              details=valid_products),
    st.builds(dict, event_type=st.just("purchase"), timestamp=st.just("2024-07-01T09:00:00.5+02:00"),
              details=st.builds(dict, order_id=st.just("O-1"), amount=st.sampled_from([19.98, 3]),
                                currency=st.just("USD"), items=st.lists(valid_products, max_size=2))),
)  # fmt: skip
mostly_valid_visits = st.builds(
    dict,
    session_id=st.just("SID-1"),
    user_id=st.just("UID-1"),
    device_type=st.sampled_from(["mobile", "desktop"]),
    geolocation=st.sampled_from(["1.5,2.5", "x"]),
    events=st.lists(st.one_of(valid_events, valid_events.map(lambda e: {"event": e}), events), max_size=4),
)
messages = st.one_of(
    mostly_valid_visits.map(msgspec.json.encode),
    visits.map(msgspec.json.encode),
    json_values.map(msgspec.json.encode),
    st.binary(max_size=40),
)


NO_TYPED_DECODER = msgspec.json.Decoder(None)
"""Refuses every visit (it accepts only ``null``, which the parser then refuses itself)."""


class ReferenceOnlyParser(VisitParser):
    """The parser with its fast path switched off: the rules alone."""

    def __init__(self) -> None:
        super().__init__()
        self._decoders = (NO_TYPED_DECODER, NO_TYPED_DECODER)


def _parse(parser: VisitParser, payloads: list[bytes]) -> RowBatch:
    return parser.parse([Message(p, f"m{i}") for i, p in enumerate(payloads)], "prop", 0)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, max_size=5))
def test_every_message_and_event_is_accounted_for(payloads: list[bytes]) -> None:
    batch = _parse(VisitParser(), payloads)
    dead = batch.tables["dead_letter"]
    whole_message_dead = [row for row in dead if row[4] is None]
    assert len(batch.tables["visits"]) + len(whole_message_dead) == len(payloads)
    for visit in batch.tables["visits"]:
        visit_id, accepted, rejected = visit[0], visit[9], visit[10]
        events = [row for row in batch.tables["events"] if row[1] == visit_id]
        dead_events = [row for row in dead if row[4] is not None and row[0].startswith(visit_id)]
        assert (len(events), len(dead_events)) == (accepted, rejected)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(messages, max_size=5))
def test_fast_path_agrees_with_the_rules(payloads: list[bytes]) -> None:
    assert _parse(VisitParser(), payloads) == _parse(ReferenceOnlyParser(), payloads)
