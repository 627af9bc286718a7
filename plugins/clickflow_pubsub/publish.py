"""Publishing visits to a Pub/Sub topic: batched requests, bounded concurrency, paced by the caller."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass

import aiohttp
import anyio
import msgspec

from clickflow.gcp import first_token
from clickflow.logs import describe

MAX_MESSAGES_PER_REQUEST = 1000  # the publish API's limit (and 10 MB per request)
MAX_BYTES_PER_REQUEST = 9 * 1024 * 1024


class PublishError(Exception):
    """The topic refused the messages (a topic that does not exist, say), or could not be reached."""


@dataclass
class PublishReport:
    messages: int = 0
    seconds: float = 0.0

    @property
    def per_second(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0


def _requests(batch: list[bytes]) -> Iterable[list[bytes]]:
    """Split a batch within the publish API's per-request limits."""
    chunk: list[bytes] = []
    size = 0
    for data in batch:
        encoded = len(data) * 4 // 3 + 64
        if chunk and (len(chunk) == MAX_MESSAGES_PER_REQUEST or size + encoded > MAX_BYTES_PER_REQUEST):
            yield chunk
            chunk, size = [], 0
        chunk.append(data)
        size += encoded
    if chunk:
        yield chunk


async def publish(
    topic: str,
    batches: AsyncIterable[list[bytes]],
    concurrency: int = 8,
    service_file: str | None = None,
) -> PublishReport:
    """Publish each batch as it comes (the caller paces them)."""
    from gcloud.aio.auth import Token  # the gcp extra

    emulator = os.environ.get("PUBSUB_EMULATOR_HOST")
    root = f"http://{emulator}/v1" if emulator else "https://pubsub.googleapis.com/v1"
    report = PublishReport()
    started = time.monotonic()
    limiter = anyio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        token = None if emulator else Token(service_file=service_file, session=session, scopes=[
            "https://www.googleapis.com/auth/pubsub"])  # fmt: skip
        await first_token(token, "PUBSUB_EMULATOR_HOST")

        async def send(chunk: list[bytes]) -> None:
            try:
                headers = {"Content-Type": "application/json"}
                if token is not None:
                    headers["Authorization"] = f"Bearer {await token.get()}"
                body = msgspec.json.encode({"messages": [{"data": base64.b64encode(d).decode()} for d in chunk]})
                async with session.post(f"{root}/{topic}:publish", data=body, headers=headers) as response:
                    if response.status >= 400:
                        answer = " ".join((await response.text(errors="replace")).split())[:300]
                        raise PublishError(f"cannot publish to {topic}: {response.status} {response.reason}: {answer}")
                report.messages += len(chunk)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise PublishError(f"cannot publish to {topic} ({root}): {describe(exc)}") from exc
            finally:
                limiter.release()

        try:
            async with anyio.create_task_group() as tasks:
                async for batch in batches:
                    for chunk in _requests(batch):
                        await limiter.acquire()
                        tasks.start_soon(send, chunk)
        except BaseExceptionGroup as group:  # the first request that failed says why
            failed = group.exceptions[0]
            if isinstance(failed, PublishError):
                raise failed from None
            raise
    report.seconds = time.monotonic() - started
    return report
