"""The ``pubsub_push`` source: an HTTP endpoint Pub/Sub pushes messages to.

It is mounted on the one monitoring server. A request is answered 2xx only once
the sinks have stored the message's rows (or its dead letters); 429 when the
pipeline is too full to take it in, 503 when a sink failed, so Pub/Sub retries
with backoff. A body that is not a valid push envelope is still taken in as a
message (the parser dead-letters it) and answered 2xx, so it is not redelivered
forever. With ``audience`` set, every request needs a valid Google-signed OIDC
token first.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Any

import aiohttp
import anyio
import msgspec
from aiohttp import web
from pydantic import ByteSize, Field

from clickflow.api import Duration, Handler, Message, Source, SourceContext, SourceOptions

GOOGLE_KEYS_URL = "https://www.googleapis.com/oauth2/v3/certs"

log = logging.getLogger(__name__)


class PubSubPushOptions(SourceOptions):
    path: str = Field(default="/pubsub/push", pattern=r"^/")
    max_body_bytes: ByteSize = ByteSize(10 * 1024 * 1024)
    audience: str | None = Field(default=None, description="Require OIDC tokens for this audience.")
    allowed_emails: list[str] = Field(default_factory=list, description="Service accounts allowed to push.")
    keys_url: str = GOOGLE_KEYS_URL
    enter_timeout: Duration = timedelta(seconds=1)
    """How long a request may wait for room in the pipeline before it is answered 429."""
    ack_timeout: Duration = timedelta(seconds=60)
    """How long a request waits for the sinks before it is answered 503 (keep above the sinks' max_age)."""


class _PushAck:
    """Lets the request handler wait until its message is settled."""

    redelivers = True

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.ok = False

    def ack(self) -> None:
        self.ok = True
        self.done.set()

    def nack(self, error: BaseException) -> None:
        self.done.set()


def message_from_body(body: bytes, headers: Any) -> Message:
    """The message in a push envelope, an unwrapped push, or (if malformed) the body itself."""
    try:
        envelope = msgspec.json.decode(body)
    except msgspec.DecodeError:
        envelope = None
    if isinstance(envelope, dict) and isinstance(envelope.get("message"), dict):
        inner = envelope["message"]
        message_id = inner.get("messageId") or inner.get("message_id")
        try:
            data = base64.b64decode(inner.get("data", ""), validate=True)
        except (binascii.Error, TypeError, ValueError):
            data = None
        if isinstance(message_id, str) and data is not None:
            return Message(data, message_id)
    elif headers.get("x-goog-pubsub-message-id"):  # payload unwrapping with metadata
        return Message(body, headers["x-goog-pubsub-message-id"])
    return Message(body, "push:" + hashlib.sha256(body).hexdigest()[:32])


class PubSubPushSource(Source):
    """Receives Pub/Sub push requests on the monitoring server; runs until stopped."""

    type_name = "pubsub_push"
    Options = PubSubPushOptions
    options: PubSubPushOptions

    _context: SourceContext | None = None
    _session: aiohttp.ClientSession | None = None
    _verifier: Any = None

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [("POST", self.options.path, self._handle)]

    @asynccontextmanager
    async def lifespan(self, context: SourceContext) -> AsyncIterator[None]:
        self._verifier = None
        if self.options.audience:
            try:
                from clickflow_pubsub.oidc import TokenVerifier
            except ImportError as exc:
                raise RuntimeError("verifying push tokens needs: pip install 'clickflow[gcp]'") from exc
            self._verifier = TokenVerifier(self.options.audience, self.options.keys_url, self.options.allowed_emails)
        async with aiohttp.ClientSession() as self._session:
            yield

    async def run(self, context: SourceContext) -> None:
        self._context = context
        try:
            while True:
                context.heartbeat()
                await anyio.sleep(5)
        finally:
            self._context = None

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        context = self._context
        if context is None:
            return web.Response(status=503, text="not accepting messages")
        if (request.content_length or 0) > self.options.max_body_bytes:
            return web.Response(status=413, text="body too large")
        if self._verifier is not None:
            from clickflow_pubsub.oidc import AuthError

            assert self._session is not None
            try:
                await self._verifier.verify(request.headers.get("Authorization"), self._session)
            except AuthError as exc:
                log.warning("%s: refused a push request: %s", self.name, exc)
                return web.Response(status=exc.status, text=str(exc))
        body = await request.read()
        if len(body) > self.options.max_body_bytes:
            return web.Response(status=413, text="body too large")
        ack = _PushAck()
        with anyio.move_on_after(self.options.enter_timeout.total_seconds()) as entering:
            await context.emit([message_from_body(body, request.headers)], ack)
        if entering.cancelled_caught:
            return web.Response(status=429, text="pipeline is full; retry later")
        with anyio.move_on_after(self.options.ack_timeout.total_seconds()):
            await ack.done.wait()
        if ack.ok:
            return web.Response(status=204)
        return web.Response(status=503, text="not stored yet; retry later")
