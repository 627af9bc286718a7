"""The ``pubsub_push`` source: an HTTP endpoint Pub/Sub pushes messages to.

It is mounted on the one monitoring server. A request is answered 2xx only once
the sinks have stored the message's rows (or its dead letters); 429 when the
pipeline is too full to take it in, 503 when a sink failed, so Pub/Sub retries
with backoff. A body that is not a valid push envelope is still taken in as a
message (the parser dead-letters it) and answered 2xx, so it is not redelivered
forever. With ``auth: oidc`` (the default) every request needs a valid
Google-signed OIDC token first. Requests that arrive while the previous batch is
being parsed share the next batch (coalescing), so a busy endpoint parses and
writes many messages at once; each is still answered by its own outcome.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any, Literal

import anyio
import msgspec
from anyio.lowlevel import checkpoint
from msgspec import Meta

from clickflow.api import Handler, Message, Source, SourceContext, valid_text
from clickflow.logs import Throttle, describe
from clickflow.metrics import shared_metric
from clickflow.options import HEARTBEAT_EVERY, ByteSize, Duration, SourceOptions, check_range
from clickflow_pubsub import MAX_ACK_DEADLINE, PUBSUB_IDS

if TYPE_CHECKING:  # aiohttp and asyncio are imported when the source starts: loading plugins stays quick
    import asyncio

    import aiohttp
    from aiohttp import web

GOOGLE_KEYS_URL = "https://www.googleapis.com/oauth2/v3/certs"

log = logging.getLogger(__name__)


MAX_BATCH = 1000
"""Requests coalesced into one batch at most."""
MAX_ENVELOPE_BYTES = 16 * 1024 * 1024
"""The largest legal push: a 10 MB message is 13.4 MB in base64, plus its attributes and envelope."""


class PubSubPushOptions(SourceOptions, kw_only=True):
    path: Annotated[str, Meta(pattern=r"^/[^\s]*$")] = "/pubsub/push"
    max_body_bytes: ByteSize = ByteSize(MAX_ENVELOPE_BYTES)
    auth: Literal["oidc", "none"] = "oidc"
    """``oidc``: every request needs a Google-signed token for ``audience``; ``none`` must be said."""
    audience: str | None = None
    """The audience push tokens are issued for."""
    allowed_emails: list[str] = msgspec.field(default_factory=list)
    """Service accounts allowed to push."""
    keys_url: str = GOOGLE_KEYS_URL
    enter_timeout: Duration = Duration(seconds=1)
    """How long a request may wait for room in the pipeline before it is answered 429."""
    ack_timeout: Duration = Duration(seconds=60)
    """How long a request waits for the sinks before it is answered 503: keep it above a write's
    time and below the subscription's acknowledgement deadline (at most 10 minutes)."""
    read_timeout: Duration = Duration(seconds=10)
    """How long a request's body may take to arrive; a slower client is answered 408."""
    max_pending_bytes: ByteSize = ByteSize(32 << 20)
    """Request bodies held at once (being read, waiting to enter, waiting to be stored), counted as
    they inflate; a request that would go over is answered 429 (before its body is read if its
    Content-Length says so), so a burst of large messages cannot exhaust memory. Until it is
    stored a body costs up to about eleven times its size, its rows included: a visit of 50,000
    events whose ids are 256 characters (a 5.9 MB request) is 50 MB of rows as JSON. Into
    ``bigquery_streaming``, 22 such requests at once took 1,067 MB at 128MiB (past Cloud Run's 1
    GiB) while a coalesced batch was parsed whole; in parts of 4 MiB (``api.PART_BYTES``) they
    take 532 MB, and at 32MiB the 5 taken peak at 308 to 315 MB (``bench_push_memory.py``)."""

    def __post_init__(self) -> None:
        check_range("max_body_bytes", self.max_body_bytes, 1, 4 * MAX_ENVELOPE_BYTES)
        for name in ("enter_timeout", "ack_timeout", "read_timeout"):  # 0: every request refused
            check_range(name, getattr(self, name), timedelta(milliseconds=1))
        if self.ack_timeout > MAX_ACK_DEADLINE:
            raise ValueError(
                f"ack_timeout is above {MAX_ACK_DEADLINE.total_seconds():g}s, the longest Pub/Sub waits for a "
                "push request's answer (the subscription's acknowledgement deadline)"
            )
        if self.max_pending_bytes < self.max_body_bytes:
            raise ValueError(
                f"max_pending_bytes ({self.max_pending_bytes}) is below max_body_bytes ({self.max_body_bytes}): "
                "a request of the largest size allowed could never be taken in"
            )
        if self.auth == "oidc" and not (self.audience or "").strip():
            raise ValueError(
                "push requests are authenticated by default: set audience to the audience of the push "
                "subscription's tokens, or auth: none to accept requests without a token"
            )
        if self.auth == "none" and (self.audience or self.allowed_emails):
            raise ValueError("auth: none verifies no token; remove audience and allowed_emails, or use auth: oidc")
        if any(not email.strip() for email in self.allowed_emails):
            raise ValueError("allowed_emails has an empty entry (an unset variable?)")

    def http_paths(self) -> list[str]:
        return [self.path]

    def answer_within(self) -> timedelta:
        return self.ack_timeout

    def heartbeat_within(self) -> timedelta:
        return HEARTBEAT_EVERY

    def ids_unique_within(self) -> str:
        return PUBSUB_IDS


_CLOCK_RESOLUTION = 0.001
"""uvloop's clock, in seconds (asyncio's own is finer)."""


class AuthError(Exception):
    """A push request refused by ``oidc.TokenVerifier``: ``status`` is 401 (who are you?), 403 (not
    you) or 503 (cannot tell now). Here, not beside the verifier, so that the endpoint catches it
    without importing the verifier's module (aiohttp's client and PyJWT) to load the plugin, or on
    every request.

    ``code`` names the cause in metrics: ``missing_token``, ``malformed_token``, ``unknown_key``,
    ``invalid_token``, ``wrong_audience``, ``sender_not_allowed`` or ``keys_unavailable``.
    """

    def __init__(self, status: int, code: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.code = code


STORED, PIPELINE_FULL, NOT_STORED = 204, 429, 503
"""What a request is answered: stored; no room in the pipeline within ``enter_timeout`` (never
entered, so Pub/Sub sends it again); a sink failed or ``ack_timeout`` passed."""


class _Waiting:
    """One request's message, waiting to enter the pipeline by ``deadline`` (the event loop's
    time), then for its outcome.

    A request waits on one asyncio future. Its ``enter_timeout`` is kept by the endpoint's one
    timer, set for the oldest waiting request, and its ``ack_timeout`` by one timer per batch: per
    request, anyio's events and cancel scopes took a fifth of the event loop's time, asyncio's
    timeout blocks a tenth, and a timer of its own (set, then cancelled) 1.8 µs on uvloop.
    """

    __slots__ = ("deadline", "message", "outcome")

    def __init__(self, message: Message, loop: asyncio.AbstractEventLoop, enter_timeout: float) -> None:
        self.message = message
        self.outcome: asyncio.Future[int] = loop.create_future()
        self.deadline = loop.time() + enter_timeout


def _answer(request: _Waiting, status: int) -> None:
    if not request.outcome.done():  # answered once: by its outcome, its timeout or the endpoint stopping
        request.outcome.set_result(status)


class _Pending:
    """The request bodies an endpoint holds, against ``max_pending_bytes``; each request's are
    reserved as it is read (``_Reservation``)."""

    __slots__ = ("bytes", "limit")

    def __init__(self, limit: int) -> None:
        self.bytes = 0
        self.limit = limit


class _Reservation:
    """One request body's share of ``_Pending``: its Content-Length at first, then what it
    inflates to, or what it sends without a length, as it is read; released when it is answered."""

    __slots__ = ("_pending", "bytes")

    def __init__(self, pending: _Pending) -> None:
        self._pending = pending
        self.bytes = 0

    def grow(self, size: int) -> bool:
        """Hold ``size`` bytes in all, if they fit: else hold no more and say so."""
        more = size - self.bytes
        if more > 0:
            if self._pending.bytes + more > self._pending.limit:
                return False
            self._pending.bytes += more
            self.bytes = size
        return True

    def release(self) -> None:
        self._pending.bytes -= self.bytes
        self.bytes = 0


class _RequestsAck:
    """A coalesced batch, taken into the pipeline: no request in it is refused 429 any more, each is
    answered by its own outcome, and all 503 if the sinks take longer than ``ack_timeout``."""

    __slots__ = ("_timer", "_waiting")
    redelivers = True

    def __init__(self, waiting: list[_Waiting], loop: asyncio.AbstractEventLoop, ack_timeout: float) -> None:
        self._waiting = waiting
        self._timer = loop.call_later(ack_timeout, self.expire)

    def ack(self) -> None:
        self._answer(STORED)

    def nack(self, error: BaseException) -> None:
        self._answer(NOT_STORED)

    def expire(self) -> None:
        self._answer(NOT_STORED)

    def _answer(self, status: int) -> None:
        self._timer.cancel()
        for request in self._waiting:
            _answer(request, status)


class _PushedMessage(msgspec.Struct):
    data: bytes = b""
    messageId: str | None = None  # the envelope's own spelling
    message_id: str | None = None


class _Envelope(msgspec.Struct):
    message: _PushedMessage


_decode_envelope = msgspec.json.Decoder(_Envelope).decode
"""A well-formed push envelope in one C call, its base64 data decoded (strictly, like
``b64decode(validate=True)``); anything else takes ``_message_from_any``'s slower path."""


def message_from_body(body: bytes, headers: Any) -> Message:
    """The message in a push envelope, an unwrapped push, or (if malformed) the body itself."""
    try:
        inner = _decode_envelope(body).message
    except (msgspec.DecodeError, RecursionError):
        return _message_from_any(body, headers)
    message_id = inner.messageId or inner.message_id
    return Message(inner.data, message_id) if message_id is not None else _message_from_any(body, headers)


def _message_from_any(body: bytes, headers: Any) -> Message:
    try:
        envelope = msgspec.json.decode(body)
    except (msgspec.DecodeError, RecursionError):
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
        return Message(body, valid_text(headers["x-goog-pubsub-message-id"]))
    return Message(body, "push:" + hashlib.sha256(body).hexdigest()[:32])


class PubSubPushSource(Source[PubSubPushOptions]):
    """Receives Pub/Sub push requests on the monitoring server; runs until stopped."""

    type_name = "pubsub_push"

    _context: SourceContext | None = None
    _loop: asyncio.AbstractEventLoop
    _session: aiohttp.ClientSession | None = None
    _verifier: Any = None
    _refused: Any = None
    _batch_sizes: Any = None
    _pending: _Pending
    _refusals: Throttle

    def routes(self) -> list[tuple[str, str, Handler]]:
        return [("POST", self.options.path, self._handle)]

    @property
    def eager(self) -> bool:
        """Each sender waits for its answer: sinks write as soon as they are free, not after ``max_age``."""
        return True

    @asynccontextmanager
    async def lifespan(self, context: SourceContext) -> AsyncIterator[None]:
        import aiohttp

        self._verifier = None
        self._refusals = Throttle()
        self._pending = pending = _Pending(self.options.max_pending_bytes)
        if self.options.auth == "oidc":
            try:
                from clickflow_pubsub.oidc import TokenVerifier
            except ImportError as exc:
                raise RuntimeError("verifying push tokens needs: pip install 'clickflow[gcp]'") from exc
            assert self.options.audience
            self._verifier = TokenVerifier(self.options.audience, self.options.keys_url, self.options.allowed_emails)
        from prometheus_client import Counter, Gauge, Histogram

        registry = context.registry
        self._refused = shared_metric(registry, Counter, "clickflow_push_refused",
                                      "Push requests answered without storing their message, by cause",
                                      ["source", "reason"])  # fmt: skip
        self._batch_sizes = shared_metric(registry, Histogram, "clickflow_push_batch_requests",
                                          "Push requests that entered the pipeline together, as one batch",
                                          ["source"], buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
                                          ).labels(self.name)  # fmt: skip
        shared_metric(registry, Gauge, "clickflow_push_pending_bytes",
                      "Push request bodies held: being read, waiting to enter, or waiting to be stored",
                      ["source"]).labels(self.name).set_function(lambda: pending.bytes)  # fmt: skip
        async with aiohttp.ClientSession() as self._session:
            yield

    async def run(self, context: SourceContext) -> None:
        """Coalesce: every request that arrived while the previous batch was being parsed goes in
        the next batch, so a busy endpoint parses and writes many messages at once.

        After a parse the loop gets one turn before the next batch is cut: requests whose bytes
        it read meanwhile have handlers ready to run, and they join too. On uvloop at 32
        concurrent requests, batches grew from about 11 requests to 16 (see ARCHITECTURE.md)."""
        import asyncio

        self._loop = asyncio.get_running_loop()
        self._waiting: list[_Waiting] = []
        self._enter_timer: asyncio.TimerHandle | None = None
        self._arrived = anyio.Event()
        self._context = context
        ack_timeout = self.options.ack_timeout.total_seconds()
        try:
            while True:
                if not self._arrived.is_set():  # under load, requests are already waiting
                    with anyio.move_on_after(HEARTBEAT_EVERY.total_seconds()):
                        await self._arrived.wait()
                context.heartbeat()
                self._arrived = anyio.Event()
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
                if self._waiting:
                    self._arrived.set()
                if not batch:
                    continue
                self._batch_sizes.observe(len(batch))
                ack = _RequestsAck(batch, self._loop, ack_timeout)
                await context.emit([request.message for request in batch], ack)
                await context.until_parsed()  # requests arriving meanwhile share the next batch,
                await checkpoint()  # and so do those read in the meantime, whose handlers run in this turn
        finally:
            self._context = None
            if self._enter_timer is not None:
                self._enter_timer.cancel()
            for request in self._waiting:  # never entered: answered at once, so Pub/Sub sends it again
                _answer(request, PIPELINE_FULL)

    def _wait(self, request: _Waiting) -> None:
        """Queue a request to enter the next batch; the endpoint's timer is set if none is."""
        self._waiting.append(request)
        if self._enter_timer is None:
            self._enter_timer = self._loop.call_at(request.deadline, self._not_entered)
        self._arrived.set()

    def _not_entered(self) -> None:
        """The endpoint's timer: requests still waiting past their ``enter_timeout`` are withdrawn,
        never stored, and the timer is set again for the oldest left. Requests wait in the order
        they came, so the expired ones are first; if the ones the timer was set for entered a batch
        meanwhile, it only sets itself again. A deadline within a millisecond counts as passed, as
        asyncio runs a timer due within its clock's resolution: uvloop's clock counts milliseconds,
        and a timer set for a deadline between two would otherwise set itself again until the next."""
        waiting, now = self._waiting, self._loop.time() + _CLOCK_RESOLUTION
        expired = 0
        while expired < len(waiting) and waiting[expired].deadline <= now:
            _answer(waiting[expired], PIPELINE_FULL)
            expired += 1
        del waiting[:expired]
        self._enter_timer = self._loop.call_at(waiting[0].deadline, self._not_entered) if waiting else None

    def _refuse(self, status: int, reason: str, text: str, logged: str | None = None) -> web.Response:
        """Answer ``status``, counted under ``reason``; ``logged`` goes to the log, within its limit."""
        from aiohttp import web

        if logged is not None and (more := self._refusals.allow(reason)) is not None:
            log.warning("%s: %s%s", self.name, logged, more)
        self._refused.labels(self.name, reason).inc()
        return web.Response(status=status, text=text)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        from aiohttp import web

        context = self._context
        if context is None:
            return web.Response(status=503, text="not accepting messages")
        if (request.content_length or 0) > self.options.max_body_bytes:
            return self._refuse(413, "too_large", "body too large")
        if self._verifier is not None:
            assert self._session is not None
            try:
                await self._verifier.verify(request.headers.get("Authorization"), self._session)
            except AuthError as exc:
                return self._refuse(exc.status, exc.code, str(exc), f"refused a push request ({exc.status}): {exc}")
        held = _Reservation(self._pending)
        if not held.grow(request.content_length or 0):
            return self._refuse_pending()
        try:
            body = await self._read_body(request, held)
            if isinstance(body, web.Response):
                return body
            enter_timeout = self.options.enter_timeout.total_seconds()
            waiting = _Waiting(message_from_body(body, request.headers), self._loop, enter_timeout)
            self._wait(waiting)
            status = await waiting.outcome
        finally:
            held.release()
        if status == STORED:
            return web.Response(status=STORED)
        if status == PIPELINE_FULL:
            return self._refuse(PIPELINE_FULL, "pipeline_full", "pipeline is full; retry later")
        return self._refuse(NOT_STORED, "not_stored", "not stored yet; retry later")

    def _refuse_pending(self) -> web.Response:
        return self._refuse(PIPELINE_FULL, "pending_bytes", "too many bytes waiting to be stored; retry later")

    async def _read_body(self, request: web.Request, held: _Reservation) -> bytes | web.Response:
        """The body, read within ``read_timeout`` and ``max_body_bytes`` whatever the headers said
        (decompressed, if a ``Content-Encoding`` says so: the limits count what it inflates to),
        ``held`` growing with it."""
        limit = self.options.max_body_bytes
        content = request.content
        if content.is_eof() and content.exception() is None:  # all of it came with the headers
            body = content.read_nowait()
            if len(body) > limit:
                return self._refuse(413, "too_large", "body too large")
            return body if held.grow(len(body)) else self._refuse_pending()
        import aiohttp  # here, not above: importing a name from a module takes a microsecond a request
        from aiohttp.web_protocol import RequestPayloadError

        chunks, size = [], 0
        try:
            with anyio.fail_after(self.options.read_timeout.total_seconds()):
                async for chunk in request.content.iter_chunked(1 << 16):
                    size += len(chunk)
                    if size > limit:
                        return self._refuse(413, "too_large", "body too large")
                    if not held.grow(size):
                        return self._refuse_pending()
                    chunks.append(chunk)
        except TimeoutError:
            late = f"a push request's body took over {self.options.read_timeout}; answered 408"
            return self._refuse(408, "slow_body", "body not received in time", late)
        except (aiohttp.ClientError, ConnectionError) as exc:
            cut = f"a push request's body was cut off: {describe(exc)}"
            return self._refuse(400, "body_cut_off", "body cut off", cut)
        except RequestPayloadError as exc:  # e.g. not in the Content-Encoding it names
            unreadable = f"a push request's body cannot be read: {' '.join(str(exc).split())}"
            return self._refuse(400, "unreadable_body", "body cannot be decoded", unreadable)
        return b"".join(chunks)
