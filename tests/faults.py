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
