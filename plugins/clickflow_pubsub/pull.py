"""The ``pubsub_pull`` source: pulls a subscription, leases what it holds, acknowledges after the sinks.

Built on gcloud-aio's ``SubscriberClient`` calls (pull, acknowledge,
modifyAckDeadline) rather than its ``subscribe()`` helper, which drops
acknowledgements under load, never extends deadlines and holds shutdown on a
pending pull. Here:

- ``pull_concurrency`` loops pull while there is room under the outstanding
  limits (flow control), and heartbeat on every round trip; a pull's messages
  enter the pipeline in parts of at most 4 MiB (``api.parts_of``), each leased
  and settled on its own;
- every held message's deadline is set to ``ack_deadline`` within a second of
  its receipt (the subscription's own deadline may be shorter), then extended
  every ``ack_deadline / 2`` for up to ``max_lease`` (lease management), so slow
  sinks do not cause redelivery;
- acknowledgements and negative acknowledgements (deadline 0) are queued and
  sent in batches by one task that lives in the source's lifespan, so they are
  still sent while the pipeline drains after a stop;
- stopping cancels the pulls at once; a message in a cancelled pull is simply
  redelivered.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Annotated, Any

import anyio
from msgspec import Meta

from clickflow.api import Message, Source, SourceContext, parts_of
from clickflow.gcp import first_token, token_of
from clickflow.logs import describe
from clickflow.metrics import shared_metric
from clickflow.options import HEARTBEAT_EVERY, ByteSize, Duration, PositiveInt, SourceOptions, check_range
from clickflow_pubsub import MAX_ACK_DEADLINE, MIN_ACK_DEADLINE, PUBSUB_IDS
from clickflow_pubsub.leases import Lease, Leases

if TYPE_CHECKING:  # imported when the source starts, so loading plugins stays quick
    from clickflow_pubsub.rest import SubscriberClient

log = logging.getLogger(__name__)

SUBSCRIPTION = r"^projects/[^/]+/subscriptions/[^/]+$"
MAX_IDS_PER_REQUEST = 2000  # acknowledge/modifyAckDeadline take at most 512 KB of ids


class PubSubPullOptions(SourceOptions, kw_only=True):
    subscription: Annotated[str, Meta(pattern=SUBSCRIPTION)]
    """projects/PROJECT/subscriptions/NAME"""
    max_outstanding_messages: PositiveInt = 100_000
    """Pulled and not yet settled. Keep it above a sink's batch in messages (DuckDB's 300,000 rows are
    about 40,000 visits), or batches wait for their ``max_age`` while pulling waits for room."""
    max_outstanding_bytes: ByteSize = ByteSize(256 * 1024 * 1024)
    pull_concurrency: PositiveInt = 2
    max_messages_per_pull: Annotated[int, Meta(ge=1, le=1000)] = 1000
    pull_timeout: Duration = Duration(seconds=20)
    ack_deadline: Duration = Duration(seconds=60)
    max_lease: Duration = Duration(hours=1)
    ack_interval: Duration = Duration(milliseconds=100)
    service_file: str | None = None
    """Service-account key; default: ADC."""

    def __post_init__(self) -> None:
        check_range("ack_deadline", self.ack_deadline, MIN_ACK_DEADLINE, MAX_ACK_DEADLINE)
        check_range("pull_timeout", self.pull_timeout, timedelta(seconds=1))  # 0 pulls in a tight loop
        check_range("ack_interval", self.ack_interval, timedelta(milliseconds=1))  # 0 acknowledges in one

    def heartbeat_within(self) -> timedelta:
        """A pull held open on a quiet subscription reports when it ends empty."""
        return max(self.pull_timeout, HEARTBEAT_EVERY)

    def ids_unique_within(self) -> str:
        return PUBSUB_IDS


def _chunks(ids: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(ids), MAX_IDS_PER_REQUEST):
        yield ids[start : start + MAX_IDS_PER_REQUEST]


class _Metrics:
    """This source's children of the plugin's metric families (shared by every pull source)."""

    def __init__(self, context: SourceContext, source: str) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        r = context.registry

        def family(kind: Any, name: str, doc: str, **extra: Any) -> Any:
            return shared_metric(r, kind, name, doc, ["source"], **extra).labels(source)

        self.pulled = family(Counter, "clickflow_pubsub_pulled", "Messages pulled")
        self.acked = family(Counter, "clickflow_pubsub_acked", "Messages acknowledged")
        self.nacked = family(Counter, "clickflow_pubsub_nacked", "Messages negatively acknowledged")
        self.extended = family(Counter, "clickflow_pubsub_lease_extensions", "Ack deadlines extended")
        self.ack_latency = family(
            Histogram, "clickflow_pubsub_ack_latency_seconds", "From a pull to its messages being settled, per pull",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )  # fmt: skip
        self.outstanding = family(Gauge, "clickflow_pubsub_outstanding", "Messages pulled and not yet settled")


class _BatchAck:
    """Settles one pulled batch by queueing its ack ids; never blocks."""

    __slots__ = ("_lease", "_source")
    redelivers = True

    def __init__(self, source: PubSubPullSource, lease: Lease) -> None:
        self._source = source
        self._lease = lease

    def ack(self) -> None:
        self._source._settle(self._lease, acknowledged=True)

    def nack(self, error: BaseException) -> None:
        self._source._settle(self._lease, acknowledged=False)


class PubSubPullSource(Source[PubSubPullOptions]):
    """Pulls a Pub/Sub subscription; runs until stopped."""

    type_name = "pubsub_pull"
    beam = "clickflow_pubsub.beam:ReadSubscription"

    _client: SubscriberClient
    _metrics: _Metrics

    @asynccontextmanager
    async def lifespan(self, context: SourceContext) -> AsyncIterator[None]:
        import aiohttp

        try:
            from clickflow_pubsub.rest import SubscriberClient
        except ImportError as exc:
            raise RuntimeError("the pubsub_pull source needs: pip install 'clickflow[gcp]'") from exc
        self._leases = Leases(self.options.max_outstanding_messages, self.options.max_outstanding_bytes)
        self._to_ack: list[str] = []
        self._to_nack: list[str] = []
        self._ack_wanted = anyio.Event()
        self._ack_lock = anyio.Lock()
        self._metrics = _Metrics(context, self.name)
        connector = aiohttp.TCPConnector(limit=self.options.pull_concurrency + 4)
        async with aiohttp.ClientSession(connector=connector) as session:
            self._client = SubscriberClient(session=session, service_file=self.options.service_file)
            await first_token(token_of(self._client), "PUBSUB_EMULATOR_HOST")
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(self._send_acks_forever)
                tasks.start_soon(self._extend_leases_forever)
                try:
                    yield
                finally:
                    with anyio.move_on_after(30, shield=True):
                        await self._send_acks()  # what the draining pipeline settled
                    tasks.cancel_scope.cancel()

    async def run(self, context: SourceContext) -> None:
        async with anyio.create_task_group() as pulls:
            for number in range(self.options.pull_concurrency):
                pulls.start_soon(self._pull_forever, context, f"pull-{number}")

    async def _pull_forever(self, context: SourceContext, loop: str) -> None:
        import aiohttp

        subscription = self.options.subscription
        timeout = int(self.options.pull_timeout.total_seconds())
        backoff = 0.1
        while True:
            while not (room := self._leases.room()):  # flow control: wait, but stay healthy
                context.heartbeat(loop)
                with anyio.move_on_after(HEARTBEAT_EVERY.total_seconds()):
                    await self._leases.freed()
            try:
                received = await self._client.pull_messages(
                    subscription, min(room, self.options.max_messages_per_pull), seconds=timeout
                )
            except (TimeoutError, aiohttp.ServerTimeoutError):
                context.heartbeat(loop)  # a held pull that found nothing
                continue
            except (aiohttp.ClientError, ValueError) as exc:  # ValueError: an answer that is not a pull response
                if isinstance(exc, aiohttp.ClientResponseError) and exc.status in (400, 401, 403, 404):
                    # a mistake to fix, not a hiccup to retry
                    raise RuntimeError(f"cannot pull {subscription}: {exc.status} {exc.message}") from exc
                log.warning("%s: pull failed, retrying in %.1fs: %s", self.name, backoff, describe(exc))
                await anyio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)
                continue
            backoff = 0.1
            context.heartbeat(loop)
            if not received:
                continue
            messages = [Message(item.message.data, item.message.message_id) for item in received]
            self._metrics.pulled.inc(len(messages))
            await self._emit(context, received, parts_of(messages))

    async def _emit(self, context: SourceContext, received: list[Any], parts: list[tuple[list[Message], int]]) -> None:
        """A pull's messages, leased at once and emitted in parts (``parts_of``): a pull response
        may hold many large messages, and the pipeline's channels count batches. A part left
        unsent when the pull is stopped is negatively acknowledged, so it comes again soon."""
        leases, start = [], 0
        for part, size in parts:
            leases.append(self._leases.add([item.ack_id for item in received[start : start + len(part)]], size))
            start += len(part)
        self._metrics.outstanding.set(self._leases.messages)
        for number, ((part, _), lease) in enumerate(zip(parts, leases, strict=True)):
            try:
                await context.emit(part, _BatchAck(self, lease))  # a part it cannot send, it nacks
            except BaseException:
                for unsent in leases[number + 1 :]:
                    self._settle(unsent, acknowledged=False)
                raise

    def _settle(self, lease: Lease, acknowledged: bool) -> None:
        self._leases.remove(lease)
        self._metrics.ack_latency.observe(time.monotonic() - lease.received)
        (self._to_ack if acknowledged else self._to_nack).extend(lease.ack_ids)
        self._metrics.outstanding.set(self._leases.messages)
        if len(self._to_ack) >= MAX_IDS_PER_REQUEST:
            self._ack_wanted.set()

    async def _send_acks_forever(self) -> None:
        interval = self.options.ack_interval.total_seconds()
        while True:
            with anyio.move_on_after(interval):
                await self._ack_wanted.wait()
            self._ack_wanted = anyio.Event()
            await self._send_acks()

    async def _send_acks(self) -> None:
        """Send what is queued; shielded, so a stop never drops acknowledgements half sent."""
        with anyio.CancelScope(shield=True):
            async with self._ack_lock:
                acks, nacks = self._to_ack, self._to_nack
                self._to_ack, self._to_nack = [], []
                subscription = self.options.subscription
                for ids, send, counter in (
                    (acks, self._client.acknowledge, self._metrics.acked),
                    (nacks, self._nack, self._metrics.nacked),
                ):
                    for chunk in _chunks(ids):
                        if await self._retrying(send, subscription, chunk):
                            counter.inc(len(chunk))

    async def _nack(self, subscription: str, ack_ids: list[str]) -> None:
        await self._client.modify_ack_deadline(subscription, ack_ids, 0)

    async def _extend_leases_forever(self) -> None:
        deadline = int(self.options.ack_deadline.total_seconds())
        interval, max_lease = deadline / 2, self.options.max_lease.total_seconds()
        while True:
            await anyio.sleep(1.0)
            due = self._leases.due_for_extension(interval, max_lease)
            for chunk in _chunks(due):
                if await self._retrying(self._client.modify_ack_deadline, self.options.subscription, chunk, deadline):
                    self._metrics.extended.inc(len(chunk))

    async def _retrying(self, call: Any, *args: Any) -> bool:
        """A few quick tries; a lost acknowledgement only means a redelivery, never a loss."""
        import aiohttp

        for attempt in range(3):
            try:
                await call(*args)
                return True
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning("%s: %s failed (attempt %d): %s", self.name, call.__name__, attempt + 1, describe(exc))
                await anyio.sleep(0.2 * 2**attempt)
        return False
