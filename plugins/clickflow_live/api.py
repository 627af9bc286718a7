"""``/dashboard``, its static files, and ``GET /api/live``: the live view as stable JSON.

The JSON (``version`` 1) is a contract; fields are only ever added::

    version              1
    generated_at         RFC 3339 time of this answer
    watermark            newest event time minus the allowed lateness (null before any event)
    throughput           {messages_per_second, events_per_second}: arrivals over the last 10 s
    totals               {messages, events, redelivered}: since the run started; messages
                         counted before and delivered again are counted only as redelivered
    page_views_per_minute  [{minute, page_views, closed}], oldest first, one per minute kept
    purchases_per_minute   [{minute, purchases, revenue}], the same minutes
    clicks_by_page       {window_minutes, pages: [{page, page_views}]}: the newest minutes, top pages
    events_by_type       {event_type: count}, since the run started
    visits_by_device     {device_type: count}
    dead_letters_by_reason {reason: count}
    ingestion_lag_seconds  {p50, p99}: receive time minus a visit's last event, recent visits
    late_events, future_events   events outside the windows
    alerts               [{name, kind, firing, since, value, threshold, minute}]: value and minute
                         are the busiest minute's since the alert last fired (0 and null before)
    recent_transitions   [{alert, state, value, threshold, minute, at}], newest last
    refresh_seconds      how often the page polls
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from clickflow.api import Handler
from clickflow_live.windows import minute_text

if TYPE_CHECKING:
    from clickflow_live.sink import LiveSink

STATIC = Path(__file__).resolve().parent / "static"
CONTENT_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html", ".LICENSE": "text/plain"}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
"""On every response of the live view: the page shows what visits carry (page URLs, event types),
written as text, never as markup; the policy keeps it so should that ever change (no inline
script, nothing from elsewhere, not framed by another site)."""


def snapshot(sink: LiveSink) -> dict[str, Any]:
    """The ``/api/live`` document."""
    aggregates = sink.aggregates
    series = aggregates.series()
    messages_rate, events_rate = sink.rates()
    watermark = aggregates.watermark_us
    return {
        "version": 1,
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "watermark": minute_text(watermark) if watermark is not None else None,
        "throughput": {"messages_per_second": round(messages_rate, 1), "events_per_second": round(events_rate, 1)},
        "totals": dict(sink.totals),
        "page_views_per_minute": [
            {"minute": minute_text(m.start_us), "page_views": m.page_views, "closed": aggregates.closed(m.start_us)}
            for m in series
        ],
        "purchases_per_minute": [
            {"minute": minute_text(m.start_us), "purchases": m.purchases, "revenue": round(m.revenue, 2)}
            for m in series
        ],
        "clicks_by_page": {
            "window_minutes": sink.recent_minutes,
            "pages": [
                {"page": page, "page_views": n}
                for page, n in aggregates.top_pages(sink.recent_minutes, sink.options.top_pages)
            ],
        },
        "events_by_type": dict(aggregates.events_by_type.most_common()),
        "visits_by_device": dict(aggregates.visits_by_device.most_common()),
        "dead_letters_by_reason": dict(aggregates.dead_letters_by_reason.most_common()),
        "ingestion_lag_seconds": aggregates.lag_quantiles(),
        "late_events": aggregates.late_events,
        "future_events": aggregates.future_events,
        "alerts": [
            {
                "name": state.rule.name,
                "kind": state.rule.kind,
                "firing": state.firing,
                "since": state.since,
                "value": state.value,
                "threshold": state.threshold if state.threshold is not None else state.rule.above,
                "minute": minute_text(state.minute_us) if state.minute_us is not None else None,
            }
            for state in sink.alerts.states
        ],
        "recent_transitions": [vars(t) for t in sink.transitions],
        "refresh_seconds": sink.options.refresh.total_seconds(),
    }


def routes(sink: LiveSink) -> list[tuple[str, str, Handler]]:
    from clickflow_live.sink import API_PATH, DASHBOARD_PATH, STATIC_PREFIX

    page = (STATIC / "dashboard.html").read_bytes()

    async def dashboard(_: web.Request) -> web.Response:
        return web.Response(body=page, content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS)

    async def live(_: web.Request) -> web.Response:
        return web.json_response(snapshot(sink), headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})

    files = {p.name: p for p in STATIC.iterdir() if p.name != "dashboard.html"}

    async def static(request: web.Request) -> web.StreamResponse:
        path = files.get(request.match_info["name"])  # only the package's own files, by name
        if path is None:
            raise web.HTTPNotFound()
        content_type = CONTENT_TYPES.get(path.suffix, "application/octet-stream")
        return web.Response(body=path.read_bytes(), content_type=content_type,
                            headers={**SECURITY_HEADERS, "Cache-Control": "max-age=3600"})  # fmt: skip

    return [
        ("GET", DASHBOARD_PATH, dashboard),
        ("GET", API_PATH, live),
        ("GET", f"{STATIC_PREFIX}/{{name}}", static),
    ]
