"""Alert transitions POSTed to a webhook, off the pipeline's path.

Transitions wait in a bounded queue that one task empties; each POST is retried
with backoff a few times. A full queue drops the newest transition (counted), so a
dead receiver never holds up or grows the pipeline.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Annotated
from urllib.parse import urlsplit

import anyio
from msgspec import Meta

from clickflow.logs import describe
from clickflow.options import Duration, OptionGroup, PositiveInt
from clickflow_live.alerts import Transition

if TYPE_CHECKING:
    import aiohttp  # imported when the sender starts, so loading plugins stays quick
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

log = logging.getLogger(__name__)


class WebhookOptions(OptionGroup, frozen=True, kw_only=True):
    url: Annotated[str, Meta(pattern=r"^https?://")]
    timeout: Duration = Duration(seconds=5)
    attempts: PositiveInt = 5
    queue: PositiveInt = 100


def shown(url: str) -> str:
    """A webhook's URL as logs show it: scheme, host and port. Its path, query and user are often
    the secret that lets one post (a chat's incoming-webhook URL), and logs travel further."""
    parts = urlsplit(url)
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:  # not a number: only a request would have found out
        port = ""
    return f"{parts.scheme}://{parts.hostname or ''}{port}/…"


class Webhook:
    def __init__(self, options: WebhookOptions) -> None:
        self.options = options
        self.shown = shown(options.url)
        self.delivered = self.failed = self.dropped = 0
        self._send: MemoryObjectSendStream[Transition]
        self._receive: MemoryObjectReceiveStream[Transition]
        self._send, self._receive = anyio.create_memory_object_stream[Transition](options.queue)
        self.done = anyio.Event()

    def post(self, transition: Transition) -> None:
        """Queue a transition; never waits."""
        try:
            self._send.send_nowait(transition)
        except (anyio.WouldBlock, anyio.ClosedResourceError):
            self.dropped += 1
            log.error("alert webhook queue full; dropped %s %s", transition.alert, transition.state)

    async def run(self) -> None:
        """Deliver queued transitions until ``finish`` and the queue is empty, or until cancelled."""
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=self.options.timeout.total_seconds())
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, self._receive:
                async for transition in self._receive:
                    await self._deliver(session, transition)
        finally:
            self.done.set()

    def finish(self) -> None:
        """No more transitions: ``run`` returns once the queued ones are delivered or given up."""
        self._send.close()

    async def _deliver(self, session: aiohttp.ClientSession, transition: Transition) -> None:
        import aiohttp

        body = {"source": "clickflow", **dataclasses.asdict(transition)}
        backoff = 0.5
        for attempt in range(1, self.options.attempts + 1):
            try:
                async with session.post(self.options.url, json=body) as response:
                    if response.status < 300:
                        self.delivered += 1
                        return
                    problem = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError) as exc:
                problem = describe(exc).replace(self.options.url, self.shown)  # InvalidURL names it
            if attempt < self.options.attempts:
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 30.0)
        self.failed += 1
        log.error("alert webhook %s: gave up on %s %s after %d attempts: %s",
                  self.shown, transition.alert, transition.state, self.options.attempts, problem)  # fmt: skip
