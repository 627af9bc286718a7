"""Realistic synthetic visits: browse, add to cart, sometimes buy.

Usable as a library::

    from clickflow_simulator import VisitGenerator
    for line in VisitGenerator(seed=1).messages(count=10):
        ...

Output is reproducible for a given ``seed`` and ``start``. Visits follow a
virtual clock, so timestamps do not depend on how fast they are generated.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import msgspec

PRODUCTS: tuple[tuple[str, str, str, float], ...] = (
    ("HDW-001", "Laptop Pro 15", "hardware", 1499.99),
    ("HDW-002", "Desktop Tower X", "hardware", 999.99),
    ("HDW-003", "4K Monitor 27", "hardware", 349.99),
    ("HDW-004", "Ultrabook A400", "hardware", 1199.99),
    ("HDW-005", "Tablet S10", "hardware", 499.99),
    ("SFT-001", "Office Suite", "software", 149.99),
    ("SFT-002", "Antivirus Plus", "software", 39.99),
    ("SFT-003", "Photo Editor Pro", "software", 79.99),
    ("SFT-004", "Video Studio", "software", 129.99),
    ("SFT-005", "Cloud Backup 1TB", "software", 59.99),
    ("PER-001", "Wireless Mouse", "peripherals", 29.99),
    ("PER-002", "Mechanical Keyboard", "peripherals", 89.99),
    ("PER-003", "USB-C Hub", "peripherals", 49.99),
    ("PER-004", "Noise-Cancelling Headset", "peripherals", 199.99),
    ("PER-005", "HD Webcam", "peripherals", 69.99),
)
SITE = "https://example.com"
PAGES = (
    *(f"{SITE}/{p}" for p in ("home", "products", "cart", "checkout", "deals", "support")),
    *(f"{SITE}/products/{p[0]}" for p in PRODUCTS),
)
EXTERNAL_REFERRERS = (
    "https://google.com",
    "https://bing.com",
    "https://facebook.com",
    "https://newsletter.example.com",
)
DEVICE_POOL = ("desktop",) * 5 + ("mobile",) * 4 + ("tablet",)  # 50/40/10 mix
_N_DEVICES, _N_PAGES, _N_PRODUCTS = len(DEVICE_POOL), len(PAGES), len(PRODUCTS)
USER_AGENTS = {
    "desktop": (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Safari/537.36",
        "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_5) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/17.5 Safari/605.1.15",
    ),
    "mobile": (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 "
        "(KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
        "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/126.0.0.0 Mobile Safari/537.36",
    ),
    "tablet": (
        "Mozilla/5.0 (iPad; CPU OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) "
        "Version/17.5 Mobile/15E148 Safari/604.1",
    ),
}
MALFORMED_KINDS = ("truncated_json", "missing_session_id", "unknown_event_type", "bad_timestamp")

EventFormat = Literal["wrapped", "bare"]

ATTACK_PAGES = (f"{SITE}/search", f"{SITE}/login")
ATTACK_AGENTS = ("python-requests/2.31.0", "Mozilla/5.0 (compatible; FloodBot/1.0)")
ATTACK_ORIGINS = ("55.751244,37.618423", "39.904202,116.407394", "-23.550520,-46.633308")


@dataclass(frozen=True)
class Spike:
    """A burst of visits (a denial-of-service attack) in the virtual clock: from ``at_s`` seconds
    after the start, for ``duration_s``, ``factor`` times the usual rate; the extra visits are
    page views of a few pages, from a few user agents and places."""

    at_s: float
    factor: float
    duration_s: float


def run_start(start: datetime | None) -> datetime:
    """The virtual time of a run's first visit: ``start``, or the second it began."""
    return start or datetime.now(UTC).replace(microsecond=0)


class VisitGenerator:
    """Generates visits as dicts (``visits``) or JSON bytes (``messages``)."""

    def __init__(
        self,
        seed: int | None = None,
        start: datetime | None = None,
        visits_per_minute: float | None = None,
        event_format: EventFormat = "wrapped",
        malformed_rate: float = 0.0,
        spike: Spike | None = None,
    ) -> None:
        self._rng = random.Random(seed)
        self._spike = spike
        self._start_s = int(run_start(start).timestamp())
        self._spacing_s = 60.0 / visits_per_minute if visits_per_minute else 0.05
        self._wrapped = event_format == "wrapped"
        self._malformed_rate = malformed_rate
        self._stamps: dict[int, str] = {}
        self._orders = 0

    def _stamp(self, second: int) -> str:
        """Timestamp text with the real data's quirks: mostly no zone, sometimes Z or offset."""
        text = self._stamps.get(second)
        if text is None:
            if len(self._stamps) > 4096:
                self._stamps.clear()
            dt = datetime.fromtimestamp(second, UTC)
            flavour = second % 10
            if flavour < 6:
                text = dt.strftime("%Y-%m-%dT%H:%M:%S")
            elif flavour < 8:
                text = dt.strftime("%Y-%m-%dT%H:%M:%SZ")
            elif flavour < 9:
                text = dt.strftime("%Y-%m-%dT%H:%M:%S.123456Z")
            else:
                text = (dt + timedelta(hours=2)).strftime("%Y-%m-%dT%H:%M:%S+02:00")
            self._stamps[second] = text
        return text

    def offset_s(self, index: int) -> float:
        """Virtual seconds from the start to the ``index``-th visit (denser during a spike)."""
        spacing, spike = self._spacing_s, self._spike
        if spike is None or index * spacing < spike.at_s:
            return index * spacing
        before = spike.at_s / spacing
        during = spike.duration_s * spike.factor / spacing
        if index < before + during:
            return spike.at_s + (index - before) * spacing / spike.factor
        return spike.at_s + spike.duration_s + (index - before - during) * spacing

    def _attacking(self, index: int) -> bool:
        spike = self._spike
        if spike is None:
            return False
        offset = self.offset_s(index)
        # during the burst, all but one visit in ``factor`` are the attacker's
        return spike.at_s <= offset < spike.at_s + spike.duration_s and self._rng.random() > 1 / spike.factor

    def _attack(self, second: int) -> dict[str, Any]:
        rand = self._rng.random
        stamp = self._stamps.get(second) or self._stamp(second)
        events = []
        for _ in range(1 + int(rand() * 3)):
            event = {
                "event_type": "page_view",
                "timestamp": stamp,
                "details": {"page_url": ATTACK_PAGES[int(rand() * 2)]},
            }
            events.append({"event": event} if self._wrapped else event)
        return {
            "session_id": f"SID-{int(rand() * 10_000_000)}",
            "user_id": None,
            "device_type": "desktop",
            "geolocation": ATTACK_ORIGINS[int(rand() * 3)],
            "user_agent": ATTACK_AGENTS[int(rand() * 2)],
            "events": events,
        }

    def visit(self, index: int) -> dict[str, Any]:
        """The ``index``-th visit of the stream (call in order for reproducible output).

        Shaped like the real sample: a few page views, sometimes items added to
        the cart, sometimes a purchase of them. Uses ``random()`` and indexing
        rather than ``choice``/``randrange``, which are several times slower.
        """
        rand = self._rng.random
        second = self._start_s + int(self.offset_s(index))
        if self._attacking(index):
            return self._attack(second)
        device = DEVICE_POOL[int(rand() * _N_DEVICES)]
        wrapped = self._wrapped
        stamps = self._stamps
        stamp = self._stamp
        events: list[dict[str, Any]] = []
        seconds: list[int] = []
        ends = second

        def add(event: dict[str, Any]) -> None:
            events.append({"event": event} if wrapped else event)
            seconds.append(second)

        previous = EXTERNAL_REFERRERS[int(rand() * 4)] if rand() < 0.6 else None
        for _ in range(1 + int(rand() * 10)):
            page = PAGES[int(rand() * _N_PAGES)]
            if previous is not None:
                details: dict[str, Any] = {"page_url": page, "referrer_url": previous}
            else:  # real data sends null, "" or nothing at all
                quirk = rand()
                details = (
                    {"page_url": page}
                    if quirk < 0.5
                    else {"page_url": page, "referrer_url": "" if quirk < 0.75 else None}
                )
            add({"event_type": "page_view", "details": details})
            previous = page
            second += int(rand() * 20)
        if rand() < 0.35:
            cart = []
            total = 0.0
            for _ in range(1 + int(rand() * 3)):
                product_id, name, category, price = PRODUCTS[int(rand() * _N_PRODUCTS)]
                quantity = 1 + int(rand() * 3)
                item = {
                    "product_id": product_id,
                    "product_name": name,
                    "category": category,
                    "price": price,
                    "quantity": quantity,
                }
                cart.append(item)
                total += price * quantity
                add({"event_type": "add_item_to_cart", "details": item})
                second += int(rand() * 15)
            if rand() < 0.4:
                self._orders += 1
                details = {
                    "order_id": f"ORD-{self._orders:07d}",
                    "amount": round(total, 2),
                    "currency": "USD",
                    "items": cart,
                }
                add({"event_type": "purchase", "details": details})
        shift = seconds[-1] - ends  # the visit ends at its time on the clock: it is sent when it is over
        for event, at in zip(events, seconds, strict=True):
            at -= shift
            (event["event"] if wrapped else event)["timestamp"] = stamps.get(at) or stamp(at)
        return {
            "session_id": f"SID-{int(rand() * 10_000_000)}",
            "user_id": f"UID-{int(rand() * 1_000_000)}",
            "device_type": device,
            "geolocation": f"{rand() * 180 - 90:.6f},{rand() * 360 - 180:.6f}",
            "user_agent": USER_AGENTS[device][int(rand() * len(USER_AGENTS[device]))],
            "events": events,
        }

    def visits(self, count: int | None = None) -> Iterator[dict[str, Any]]:
        """The visits from the first, ``count`` of them (endless without)."""
        return map(self.visit, _indices(count))

    def message(self, index: int) -> bytes:
        """The ``index``-th visit as a JSON message, malformed at ``malformed_rate``."""
        visit = self.visit(index)
        if self._malformed_rate and self._rng.random() < self._malformed_rate:
            return self._break(visit)
        return msgspec.json.encode(visit)

    def messages(self, count: int | None = None) -> Iterator[bytes]:
        """The messages from the first, ``count`` of them (endless without)."""
        return map(self.message, _indices(count))

    def _break(self, visit: dict[str, Any]) -> bytes:
        kind = self._rng.choice(MALFORMED_KINDS)
        if kind == "truncated_json":
            return msgspec.json.encode(visit)[:-7]
        if kind == "missing_session_id":
            del visit["session_id"]
            return msgspec.json.encode(visit)
        event = visit["events"][0]
        event = event.get("event", event)
        if kind == "unknown_event_type":
            event["event_type"] = "hover"
        else:
            event["timestamp"] = "yesterday at noon"
        return msgspec.json.encode(visit)


def _indices(count: int | None) -> Iterator[int]:
    return iter(range(count)) if count is not None else itertools.count()
