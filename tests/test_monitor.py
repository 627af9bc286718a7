"""The monitoring app: Prometheus metrics, liveness from heartbeats, readiness from sinks."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from clickflow.config import Pipeline
from clickflow.monitor import build_app
from clickflow.runtime import Runtime

pytestmark = [pytest.mark.asyncio, pytest.mark.event_loops]  # on uvloop too: it serves the monitor in a run

PIPELINE = "sources: [{type: simulator, count: 1}]\nsinks: [{type: duckdb, path: ':memory:'}]\n"


@pytest.fixture
def runtime(pipeline: Callable[..., Pipeline]) -> Runtime:
    return Runtime(pipeline(PIPELINE + "runtime: {heartbeat_max_age: 30s}"))


async def test_metrics_are_prometheus_text(aiohttp_client: Any, runtime: Runtime) -> None:
    runtime.metrics.messages_received.labels("simulator").inc(3)
    runtime.metrics.dead_letters.labels("simulator", "invalid_json").inc()
    client = await aiohttp_client(build_app(runtime))
    response = await client.get("/metrics")
    body = await response.text()
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    assert 'clickflow_messages_received_total{source="simulator"} 3.0' in body
    assert 'clickflow_dead_letters_total{reason="invalid_json",source="simulator"} 1.0' in body
    for name in ("clickflow_batch_write_seconds", "clickflow_messages_in_flight", "clickflow_rows_written"):
        assert f"# HELP {name}" in body


async def test_healthz_fails_when_a_source_stops_beating(aiohttp_client: Any, runtime: Runtime) -> None:
    client = await aiohttp_client(build_app(runtime))
    runtime.heartbeats["simulator"] = time.time()
    assert (await client.get("/healthz")).status == 200
    runtime.heartbeats["simulator"] = time.time() - 60
    response = await client.get("/healthz")
    assert response.status == 503
    assert (await response.json())["status"] == "stalled"


async def test_readyz_follows_the_sinks(aiohttp_client: Any, runtime: Runtime) -> None:
    client = await aiohttp_client(build_app(runtime))
    assert (await client.get("/readyz")).status == 503
    runtime.ready = True
    assert (await client.get("/readyz")).status == 200
