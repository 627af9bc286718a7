"""The live sink end to end: its figures equal SQL over the DuckDB written in the same run, its
webhook delivers (and survives a dead receiver), and the dashboard renders in headless Chromium."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import duckdb
import pytest
from aiohttp import web

from clickflow.config import Pipeline
from clickflow.runtime import Runtime
from clickflow_live.api import snapshot
from clickflow_live.sink import LiveSink
from clickflow_live.webhook import shown
from tests.emulators import CLICKFLOW, free_port, ready, wait_for

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("CLICKFLOW_REQUIRE_EMULATORS") == "1"


def sql(db: Path, query: str) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(db), read_only=True) as con:
        con.execute("SET TimeZone = 'UTC'")
        return con.execute(query).fetchall()


def minute(value: Any) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:00Z")


def test_the_live_figures_equal_sql_over_the_same_run(pipeline: Callable[..., Pipeline], tmp_path: Path) -> None:
    db = tmp_path / "live.duckdb"
    runtime = Runtime(pipeline(
        "sources: [{type: simulator, count: 20000, seed: 3, malformed_rate: 0.02, spike_at: 5m,"
        " start: '2024-07-01T00:00:00Z'}]\n"
        f"sinks: [{{type: duckdb, path: '{db}'}},"
        " {type: live, allowed_lateness: 1h, keep_minutes: 1440, top_pages: 100}]\n"
        "monitor: {port: 0}\n"
    ))  # fmt: skip
    anyio.run(runtime.run)
    sink = runtime.sinks[1]
    assert isinstance(sink, LiveSink)
    live = snapshot(sink)
    assert live["late_events"] == live["future_events"] == 0

    per_minute = sql(db, "SELECT date_trunc('minute', event_timestamp) m, count(*) FROM events "
                         "WHERE event_type = 'page_view' GROUP BY m ORDER BY m")  # fmt: skip
    shown = [(m["minute"], m["page_views"]) for m in live["page_views_per_minute"] if m["page_views"]]
    assert shown == [(minute(m), n) for m, n in per_minute]
    assert max(n for _, n in shown) > 3 * sorted(n for _, n in shown)[len(shown) // 2]  # the attack is there

    purchases = sql(db, "SELECT date_trunc('minute', event_timestamp) m, count(*), round(sum(amount), 2) FROM events "
                        "WHERE event_type = 'purchase' GROUP BY m ORDER BY m")  # fmt: skip
    bought = [(m["minute"], m["purchases"], m["revenue"]) for m in live["purchases_per_minute"] if m["purchases"]]
    assert bought == [(minute(m), n, pytest.approx(r, abs=0.01)) for m, n, r in purchases]

    assert live["events_by_type"] == dict(sql(db, "SELECT event_type, count(*) FROM events GROUP BY ALL"))
    assert live["visits_by_device"] == dict(sql(db, "SELECT device_type, count(*) FROM visits GROUP BY ALL"))
    assert live["dead_letters_by_reason"] == dict(sql(db, "SELECT reason, count(*) FROM dead_letter GROUP BY ALL"))
    recent = sql(db, "SELECT page_url, count(*) FROM events WHERE event_type = 'page_view' AND event_timestamp >= "
                     "(SELECT date_trunc('minute', max(event_timestamp)) - INTERVAL 4 MINUTE FROM events "
                     "WHERE event_type = 'page_view') GROUP BY ALL")  # fmt: skip
    assert {p["page"]: p["page_views"] for p in live["clicks_by_page"]["pages"]} == dict(recent)
    assert live["totals"]["events"] == sql(db, "SELECT count(*) FROM events")[0][0]


@pytest.mark.parametrize("receiver", ["flaky", "dead"])
def test_alerts_reach_the_webhook_and_a_dead_one_holds_nothing_up(
    pipeline: Callable[..., Pipeline], tmp_path: Path, receiver: str, caplog: pytest.LogCaptureFixture
) -> None:
    received: list[dict[str, Any]] = []
    port = free_port()

    async def hook(request: web.Request) -> web.Response:
        received.append(await request.json())
        return web.Response(status=500 if len(received) == 1 else 204)  # the first try fails

    async def main() -> Runtime:
        runner = web.AppRunner(web.Application())
        runner.app.router.add_post("/hook/T0/B0/s3cret", hook)  # its path is the secret, as a chat's is
        await runner.setup()
        if receiver == "flaky":
            await web.TCPSite(runner, "127.0.0.1", port).start()
        runtime = Runtime(pipeline(
            "sources: [{type: simulator, count: 3000, seed: 4, start: '2024-07-01T00:00:00Z'}]\n"
            f"sinks: [{{type: duckdb, path: '{tmp_path}/w.duckdb'}}, {{type: live, allowed_lateness: 1h,"
            f" alerts: [{{name: busy, kind: threshold, above: 100}}],"
            f" webhook: {{url: 'http://127.0.0.1:{port}/hook/T0/B0/s3cret', attempts: 3, timeout: 1s}}}}]\n"
            "runtime: {shutdown_timeout: 10s}\nmonitor: {port: 0}\n"
        ))  # fmt: skip
        await runtime.run()  # the sink delivers, or gives up on, its queued alerts before it closes
        await runner.cleanup()
        return runtime

    started = time.monotonic()
    runtime = anyio.run(main)
    sink = runtime.sinks[1]
    assert isinstance(sink, LiveSink) and sink.webhook is not None
    assert runtime.summary.messages["simulator"] == 3000
    if receiver == "flaky":
        assert (sink.webhook.delivered, sink.webhook.failed) == (1, 0)
        assert len(received) == 2 and received[1] == received[0]
        assert received[0]["alert"] == "busy" and received[0]["state"] == "firing" and received[0]["value"] > 100
    else:
        assert (sink.webhook.delivered, sink.webhook.failed) == (0, 1)
        assert f"alert webhook http://127.0.0.1:{port}/…: gave up on busy firing after 3 attempts" in caplog.text
    assert "s3cret" not in caplog.text
    assert time.monotonic() - started < 30


@pytest.mark.parametrize(
    ("url", "logged"),
    [("https://hooks.example.com/services/T0/B0/s3cret", "https://hooks.example.com/…"),
     ("http://user:s3cret@10.0.0.7:8080/hook?token=s3cret", "http://10.0.0.7:8080/…"),
     ("http://host:port/s3cret", "http://host/…")],
)  # fmt: skip
def test_a_webhooks_url_is_logged_without_its_path_query_or_user(url: str, logged: str) -> None:
    assert shown(url) == logged


@pytest.fixture
def chromium() -> str:
    if CHROMIUM is None:
        message = "headless Chromium is missing: apt-get install chromium"
        pytest.fail(message) if REQUIRED else pytest.skip(message)
    return CHROMIUM


def headless(browser: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
             "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}"]  # fmt: skip
    # a browser away from UTC: the page must show UTC times whatever the zone it runs in
    environment = {**os.environ, "TZ": "America/New_York"}
    return subprocess.run([browser, *flags, *args], capture_output=True, text=True, timeout=60, env=environment)


@pytest.mark.integration
def test_the_dashboard_renders_live_numbers_in_a_browser(chromium: str, tmp_path: Path) -> None:
    port, pipeline = free_port(), tmp_path / "p.yaml"
    pipeline.write_text(
        "sources: [{type: simulator, visits_per_minute: 30000, seed: 5, malformed_rate: 0.02}]\n"
        f"sinks: [{{type: duckdb, path: '{tmp_path}/d.duckdb'}},"
        " {type: live, alerts: [{name: ceiling, kind: threshold, above: 1000},"
        " {name: far, kind: threshold, above: 1000000000}]}]\n"
        f"monitor: {{port: {port}}}\n"
    )
    process = subprocess.Popen([*CLICKFLOW, "run", "--no-progress", str(pipeline)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}/dashboard"
    try:
        wait_for(lambda: ready(port), 30)
        time.sleep(2)
        rendered = headless(chromium, tmp_path / "profile", "--enable-logging=stderr", "--virtual-time-budget=6000",
                            "--dump-dom", url)  # fmt: skip
        dom = rendered.stdout
        with urllib.request.urlopen(url) as page:
            headers = page.headers
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/live") as answer:
            minutes = json.load(answer)["page_views_per_minute"]
        busiest = max(m["page_views"] for m in minutes)
        shot = tmp_path / "dashboard.png"
        headless(chromium, tmp_path / "profile2", "--window-size=1400,1000", "--virtual-time-budget=6000",
                 f"--screenshot={shot}", url)  # fmt: skip
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert f"serving http://127.0.0.1:{port}/dashboard" in stderr
    updates = int(re.search(r'data-updates="(\d+)"', dom).group(1))  # type: ignore[union-attr]
    assert updates >= 2, "the page should have polled /api/live more than once"
    messages = int(re.search(r'id="messages-total">([\d,]+)<', dom).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert messages > 100
    pages = re.findall(r'<span title="(https://example\.com/[^"]*)">', dom)
    assert len(pages) >= 5
    assert "ALERT: ceiling" in dom  # 30,000 visits a minute is far above 1,000 page views
    assert re.search(r'<td>[\d,]+<div class="hint">\d\d:\d\d</div></td>', dom)  # its value, and that minute
    # the chart's y axis (as uPlot set it) fits the page views (read later, so no fewer), not the far threshold
    top = int(re.search(r'id="page-views-chart"[^>]*data-top="(\d+)"', dom).group(1))  # type: ignore[union-attr]
    assert 1100 <= top <= math.ceil(1.1 * busiest)
    assert re.search(r'id="dead-letters"[^>]*>.*invalid_json', dom, re.S)
    # seconds into the run no minute has closed: the tile says when the first will, not just "-",
    # at a minute of the run's in UTC (in New York's zone it would be five hours off)
    hint = re.fullmatch(r"(first once the watermark passes|the minute of) (\d\d:\d\d)",
                        re.search(r'id="last-minute-at">([^<]*)<', dom).group(1))  # type: ignore[union-attr]  # fmt: skip
    assert hint is not None, dom
    starts = [datetime.fromisoformat(m["minute"].replace("Z", "+00:00")) for m in minutes]
    assert hint.group(2) in {f"{t + timedelta(minutes=k):%H:%M}" for t in starts for k in (0, 1)}, (hint, starts)
    assert "times in UTC" in dom
    assert shot.stat().st_size > 20_000
    assert "script-src 'self'" in headers["Content-Security-Policy"] and headers["X-Content-Type-Options"] == "nosniff"
    assert "Content Security Policy" not in rendered.stderr  # the page needs nothing the policy refuses
