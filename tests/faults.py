"""An HTTP proxy in front of an emulator that injects the failures real services produce.

The client under test talks to the proxy over the network exactly as it would
to BigQuery; the proxy forwards to the real emulator, except that it can answer
the next requests with an error status, and can answer chosen rows of
``insertAll`` requests as ``stopped`` (not forwarding them), as BigQuery does
for the valid rows of a request that also held an invalid one. It records every
``insertAll`` body.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp
from aiohttp import web

from tests.emulators import free_port


class FaultyProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.fail_next: list[int] = []
        """HTTP statuses to answer the next ``insertAll`` requests with, in order."""
        self.stop_once: set[str] = set()
        """insertIds to answer ``stopped`` the first time they are sent."""
        self.insert_bodies: list[bytes] = []
        self.failed = 0

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if request.path.endswith("/insertAll"):
            self.insert_bodies.append(body)
            if self.fail_next:
                self.failed += 1
                status = self.fail_next.pop(0)
                error = {"error": {"code": status, "message": "injected", "errors": [{"reason": "injected"}]}}
                return web.json_response(error, status=status)
            if self.stop_once:
                return await self._insert_with_stops(request, json.loads(body))
        return await self._forward(request, body)

    async def _forward(self, request: web.Request, body: bytes) -> web.Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(
            request.method, self.upstream + request.path_qs, data=body, headers=headers
        ) as answer:
            payload = await answer.read()
            return web.Response(status=answer.status, body=payload, content_type=answer.content_type)

    async def _insert_with_stops(self, request: web.Request, body: dict[str, Any]) -> web.Response:
        rows = body["rows"]
        stopped = [i for i, row in enumerate(rows) if row["insertId"] in self.stop_once]
        self.stop_once -= {rows[i]["insertId"] for i in stopped}
        forwarded = [i for i in range(len(rows)) if i not in stopped]
        answer = await self._forward(request, json.dumps({**body, "rows": [rows[i] for i in forwarded]}).encode())
        result = json.loads(answer.body)  # type: ignore[arg-type]
        errors = [{"index": forwarded[e["index"]], "errors": e["errors"]} for e in result.get("insertErrors", [])]
        errors += [{"index": i, "errors": [{"reason": "stopped", "message": ""}]} for i in stopped]
        return web.json_response({**result, "insertErrors": errors})

    @contextmanager
    def running(self) -> Iterator[str]:
        """Serve on a free port in a thread of its own; yields ``host:port``."""
        port, started, loop = free_port(), threading.Event(), asyncio.new_event_loop()

        async def serve() -> web.AppRunner:
            self._session = aiohttp.ClientSession()
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_route("*", "/{tail:.*}", self._handle)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()
            return runner

        def main() -> None:
            asyncio.set_event_loop(loop)
            self._runner = loop.run_until_complete(serve())
            started.set()
            loop.run_forever()

        thread = threading.Thread(target=main, daemon=True)
        thread.start()
        started.wait(10)
        try:
            yield f"127.0.0.1:{port}"
        finally:

            async def stop() -> None:
                await self._runner.cleanup()
                await self._session.close()

            asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()


class ConnectionCutter:
    """A TCP proxy in front of a gRPC server that cuts the first ``cuts`` connections once their
    client has sent ``after`` bytes: the calls in flight fail as with a network fault, and the
    client's next connection goes through."""

    def __init__(self, upstream: str, cuts: int = 1, after: int = 4096) -> None:
        self.upstream = upstream
        self.cuts = cuts
        self.after = after
        self.cut = 0

    @contextmanager
    def running(self) -> Iterator[str]:
        """Serve on a free local port; yields ``host:port`` for the client."""
        import socket

        listener = socket.create_server(("127.0.0.1", 0))
        listener.settimeout(0.2)
        stopped = threading.Event()

        def accept() -> None:
            while not stopped.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                threading.Thread(target=self._serve, args=(client,), daemon=True).start()

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        try:
            yield f"127.0.0.1:{listener.getsockname()[1]}"
        finally:
            stopped.set()
            thread.join(timeout=5)
            listener.close()

    def _serve(self, client: Any) -> None:
        import socket

        host, port = self.upstream.rsplit(":", 1)
        server = socket.create_connection((host, int(port)))
        cut = self.cut < self.cuts
        if cut:
            self.cut += 1

        def pipe(source: Any, target: Any, counted: bool) -> None:
            sent = 0
            try:
                while data := source.recv(65536):
                    target.sendall(data)
                    sent += len(data)
                    if counted and cut and sent >= self.after:
                        break
            except OSError:
                pass
            for end in (source, target):
                with contextlib.suppress(OSError):
                    end.shutdown(socket.SHUT_RDWR)

        back = threading.Thread(target=pipe, args=(server, client, False), daemon=True)
        back.start()
        pipe(client, server, True)
        back.join(timeout=10)
        client.close()
        server.close()
