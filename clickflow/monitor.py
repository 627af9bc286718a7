"""The one HTTP server of a clickflow process: metrics, health, and plugin routes.

``/metrics`` serves Prometheus text, ``/healthz`` reports whether every running
source's loop is alive (for an instance group's health check), ``/readyz``
whether the sinks are connected. Push-style sources mount their routes here too.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from clickflow.api import AnySink, AnySource
from clickflow.config import MonitorOptions
from clickflow.logs import Throttle
from clickflow.runtime import Runtime

log = logging.getLogger(__name__)

RUNTIME = web.AppKey("runtime", Runtime)


async def _metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[RUNTIME].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _healthz(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    if runtime.healthy():
        return web.json_response({"status": "ok", "sources": sorted(runtime.heartbeats)})
    return web.json_response({"status": "stalled", "heartbeats": runtime.heartbeats}, status=503)


async def _readyz(request: web.Request) -> web.Response:
    if request.app[RUNTIME].ready:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "not ready"}, status=503)


class _ClientErrorsAsWarnings(logging.Filter):
    """aiohttp logs a request it cannot parse (the client's error, answered 400) at ERROR with a
    traceback, so anyone who can reach the port could fill the log, and error reporting, with
    them: here they are WARNING lines, one a cause (the parser's error type) every 10 s at most,
    saying how many were left out."""

    def __init__(self) -> None:
        super().__init__()
        self._throttle = Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and 400 <= error.code < 500:
            more = self._throttle.allow(type(error).__name__)
            if more is None:
                return False
            reason = " ".join(str(error.message).split())
            record.msg, record.args = f"{record.getMessage()}: {error.code} {reason}{more}", ()
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


def build_app(runtime: Runtime) -> web.Application:
    app = web.Application()  # routes that take large bodies read them with limits of their own
    app[RUNTIME] = runtime
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    components: list[AnySource | AnySink] = [*runtime.sources, *runtime.sinks]
    for component in components:
        for method, path, handler in component.routes():
            app.router.add_route(method, path, handler)
    return app


@asynccontextmanager
async def serve(runtime: Runtime, options: MonitorOptions) -> AsyncIterator[str]:
    """Serve the monitoring app while the block runs; yields its base URL."""
    runner = web.AppRunner(
        build_app(runtime),
        access_log=None,
        handle_signals=False,
        keepalive_timeout=options.idle_timeout.total_seconds(),
        # A body a handler left unread (refused as too large, undecodable) is not drained after the
        # answer: its connection is closed. Draining inflated compressed bodies for up to 10 s
        # (aiohttp's default) and logged an error for one that could not be decoded.
        lingering_time=0,
    )
    await runner.setup()
    client_errors = _ClientErrorsAsWarnings()
    logging.getLogger("aiohttp.server").addFilter(client_errors)
    try:
        site = web.TCPSite(runner, options.host, options.port)
        try:
            await site.start()
        except OSError as exc:  # a port in use, a host name that does not resolve or is not this machine's
            why = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)  # < 0: gaierror
            raise OSError(f"monitor: cannot listen on {options.host}:{options.port}: {why}") from exc
        host, port = runner.addresses[0][:2]
        url = f"http://{host}:{port}"
        log.info("monitoring on %s (/metrics /healthz /readyz)", url)
        components: list[AnySource | AnySink] = [*runtime.sources, *runtime.sinks]
        served = [path for c in components for _, path, _ in c.routes() if "{" not in path]
        for path in served:
            log.info("serving %s%s", url, path)
        yield url
    finally:
        await runner.cleanup()
        logging.getLogger("aiohttp.server").removeFilter(client_errors)
