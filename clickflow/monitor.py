"""The one HTTP server of a clickflow process: metrics, health, and plugin routes.

``/metrics`` serves Prometheus text, ``/healthz`` reports whether every running
source's loop is alive (for an instance group's health check), ``/readyz``
whether the sinks are connected. Push-style sources mount their routes here too.

Each connection holds a file descriptor, and so do the pipeline's spool files, log
segments and sockets. Anyone who reaches the port could open connections until the
process had none left, and a sink that cannot open a file fails the run. So the
server takes at most ``max_connections`` at once: by default 1,024, or half the
process's open-file limit less a burst of accepts (``BACKLOG``) if that is less,
after the process raises its soft limit to the hard one, as Go programs do. A
connection past the cap is answered 503 and closed without being read, and counted.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import cast

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, generate_latest

from clickflow.api import AnySink, AnySource
from clickflow.config import MonitorOptions
from clickflow.logs import Throttle
from clickflow.runtime import Runtime

log = logging.getLogger(__name__)

RUNTIME = web.AppKey("runtime", Runtime)
DEFAULT_MAX_CONNECTIONS = 1024
BACKLOG = 128
"""The listen queue, aiohttp's default. asyncio's loop accepts this many connections at once before
it makes their protocols, where the cap counts them: so the cap leaves room for one such burst."""
FILES_KEPT = 128
"""Open files a ``max_connections`` set by hand should leave the pipeline, besides a burst of
accepts, at least (else a warning)."""
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


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
    saying how many were left out. Each is counted in ``bad_requests`` by its cause: aiohttp
    answers them before any handler or middleware, and its log line is the only sign of them."""

    def __init__(self, bad_requests: Counter) -> None:
        super().__init__()
        self._throttle = Throttle()
        self._bad_requests = bad_requests

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError) and 400 <= error.code < 500:
            self._bad_requests.labels(type(error).__name__).inc()
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


def open_files_limit() -> int:
    """The process's open-file limit, its soft limit raised to the hard one first where it can be."""
    try:
        import resource
    except ImportError:  # Windows: no such limit on sockets
        return 1 << 20
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as exc:  # e.g. macOS refuses an infinite soft limit
            log.debug("cannot raise the open-file limit to %s: %s", hard, exc)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def connection_cap(options: MonitorOptions) -> int:
    """The connections the server takes at once (see the module's docstring)."""
    files = open_files_limit()
    if options.max_connections is None:
        return max(16, min(DEFAULT_MAX_CONNECTIONS, files // 2 - BACKLOG))
    left = files - options.max_connections - BACKLOG
    if left < FILES_KEPT:
        log.warning("monitor.max_connections: %d connections (and a burst of %d being accepted) leave the "
                    "pipeline %d of the process's %d open files (ulimit -n); a sink that cannot open a file "
                    "fails the run", options.max_connections, BACKLOG, max(left, 0), files)  # fmt: skip
    return options.max_connections


class _ConnectionCap:
    """The listening socket's protocol factory: aiohttp's handler for each new connection while
    fewer than ``limit`` are open, else one that answers 503 and closes.

    Connections are counted as their protocols are made, not when aiohttp registers them: a loop
    makes a burst of protocols before it registers the first, and a flood's bursts went past the
    cap by hundreds. (asyncio's loop also accepts a burst before it makes their protocols: see
    ``BACKLOG``.)"""

    def __init__(self, handlers: web.Server, limit: int, refused: Counter) -> None:
        self.open = 0
        self._handlers = handlers
        self._limit = limit
        self._refused = refused
        self._throttle = Throttle()

    def __call__(self) -> _Counted | _Refused:
        if self.open < self._limit:
            self.open += 1
            return _Counted(self._handlers(), self)
        self._refused.inc()
        if (more := self._throttle.allow("connections")) is not None:
            log.warning("monitor: %d connections open (max_connections): a new one was answered 503%s",
                        self._limit, more)  # fmt: skip
        return _Refused()


class _Counted:
    """A connection within the cap: aiohttp's handler, whose methods the transport calls directly
    (no call in between), and one off the count when the connection is lost."""

    __slots__ = ("_cap", "_handler", "connection_made", "data_received", "eof_received", "pause_writing",
                 "resume_writing")  # fmt: skip

    def __init__(self, handler: RequestHandler, cap: _ConnectionCap) -> None:
        self._cap = cap
        self._handler = handler
        self.connection_made = handler.connection_made
        self.data_received = handler.data_received
        self.eof_received = handler.eof_received
        self.pause_writing = handler.pause_writing
        self.resume_writing = handler.resume_writing

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cap.open -= 1
        self._handler.connection_lost(exc)


class _Refused(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio.Transport subclasses
        transport.write(_BUSY)
        transport.close()


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
    assert runner.server is not None
    registry = runtime.metrics.registry
    refused = Counter("clickflow_monitor_connections_refused", "Connections answered 503 past max_connections",
                      registry=registry)  # fmt: skip
    cap = _ConnectionCap(runner.server, connection_cap(options), refused)
    Gauge("clickflow_monitor_connections", "Connections open to the server", registry=registry).set_function(
        lambda: cap.open
    )
    bad_requests = Counter("clickflow_monitor_bad_requests", "Requests aiohttp could not parse, answered 400, "
                           "by its error type", ["cause"], registry=registry)  # fmt: skip
    client_errors = _ClientErrorsAsWarnings(bad_requests)
    logging.getLogger("aiohttp.server").addFilter(client_errors)
    listening: asyncio.AbstractServer | None = None
    try:
        try:
            factory = cast(Callable[[], asyncio.BaseProtocol], cap)  # its protocols have every method a transport calls
            listening = await asyncio.get_running_loop().create_server(
                factory, options.host, options.port, backlog=BACKLOG
            )
        except OSError as exc:  # a port in use, a host name that does not resolve or is not this machine's
            why = os.strerror(exc.errno) if exc.errno and exc.errno > 0 else exc.strerror or str(exc)  # < 0: gaierror
            raise OSError(f"monitor: cannot listen on {options.host}:{options.port}: {why}") from exc
        host, port = listening.sockets[0].getsockname()[:2]
        url = f"http://{host}:{port}"
        log.info("monitoring on %s (/metrics /healthz /readyz)", url)
        components: list[AnySource | AnySink] = [*runtime.sources, *runtime.sinks]
        served = [path for c in components for _, path, _ in c.routes() if "{" not in path]
        for path in served:
            log.info("serving %s%s", url, path)
        yield url
    finally:
        if listening is not None:
            listening.close()  # not wait_closed(): it waits for open connections, which cleanup() closes
        await runner.cleanup()
        logging.getLogger("aiohttp.server").removeFilter(client_errors)
