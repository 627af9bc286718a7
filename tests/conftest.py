"""Shared fixtures: plugin registry, pipelines built from YAML text, visit builders."""

from __future__ import annotations

import asyncio
import copy
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest

import tests.fakes  # noqa: F401 - registered as a plugin by fake_registry
from clickflow.config import Pipeline, parse_pipeline
from clickflow.plugins import Registry, load_plugins

pytest_plugins = ["tests.emulators", "tests.gcp_emulators"]

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"

VALID_VISIT: dict[str, Any] = {
    "session_id": "SID-1",
    "user_id": "UID-1",
    "device_type": "mobile",
    "geolocation": "37.7749,-122.4194",
    "user_agent": "Mozilla/5.0",
    "events": [
        {"event_type": "page_view", "timestamp": "2024-07-01T09:00:00",
         "details": {"page_url": "https://example.com/home", "referrer_url": None}},
        {"event_type": "add_item_to_cart", "timestamp": "2024-07-01T09:00:05Z",
         "details": {"product_id": "P-1", "product_name": "Mouse", "category": "peripherals",
                     "price": 29.99, "quantity": 2}},
        {"event_type": "purchase", "timestamp": "2024-07-01T11:00:10+02:00",
         "details": {"order_id": "O-1", "amount": 59.98, "currency": "USD",
                     "items": [{"product_id": "P-1", "product_name": "Mouse", "category": "peripherals",
                                "price": 29.99, "quantity": 2}]}},
    ],
}  # fmt: skip


@pytest.fixture
def visit() -> Callable[..., dict[str, Any]]:
    """A fresh valid visit (bare events); keyword arguments replace top-level fields."""

    def build(**fields: Any) -> dict[str, Any]:
        result = copy.deepcopy(VALID_VISIT)
        result.update(fields)
        return result

    return build


@pytest.fixture(scope="session")
def registry(clickflow_registry: Registry) -> Registry:
    return clickflow_registry


@pytest.fixture
def pipeline(clickflow_pipeline: Callable[..., Pipeline]) -> Callable[..., Pipeline]:
    return clickflow_pipeline


@pytest.fixture(scope="session")
def fake_registry() -> Registry:
    """The plugins with the fakes of ``tests/fakes.py`` (unit tests of the runtime only)."""
    return load_plugins(extra=[(sys.modules["tests.fakes"], "tests")])


@pytest.fixture
def fake_pipeline(fake_registry: Registry) -> Iterator[Callable[[str], Pipeline]]:
    """YAML text to a pipeline of fake plugins, their shared state reset before and after."""
    from tests import fakes

    fakes.reset()
    yield lambda text: parse_pipeline(text, fake_registry, "t.yaml", {})
    fakes.reset()


def files_into(path: str | Path, sink: str) -> str:
    """Pipeline YAML: the file source reading ``path`` into one sink (its options, flow style)."""
    return f"sources: [{{type: file, path: '{path}'}}]\nsinks: [{{{sink}}}]"


def table_counts(path: str | Path) -> dict[str, int]:
    with duckdb.connect(str(path), read_only=True) as con:
        return {
            name: con.execute(f"SELECT count(*) FROM {name}").fetchone()[0]  # type: ignore[index]
            for name in ("visits", "events", "purchase_items", "dead_letter")
        }


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Callable[[], Any]]:
    """pytest-asyncio's tests run on asyncio's loop; those marked ``event_loops`` on uvloop's too."""
    factories: dict[str, Callable[[], Any]] = {"asyncio": asyncio.new_event_loop}
    if item.get_closest_marker("event_loops"):
        import uvloop

        factories["uvloop"] = uvloop.new_event_loop
    return factories


@pytest.fixture
def anyio_backend() -> str:
    """Async tests run on asyncio, as clickflow does."""
    return "asyncio"
