"""``gs://`` input for the ``file`` source: listing by glob, and streaming reads.

Objects are listed under the pattern's literal prefix and matched like local
globs (``globs``: ``*``, ``?`` and ``[...]`` stay within one segment, ``**`` crosses them).
A download is read as it arrives: the source's reader runs in a worker thread
and pulls each chunk from the event loop, so memory stays constant whatever
the object's size. ``STORAGE_EMULATOR_HOST`` points at an emulator.
"""

from __future__ import annotations

import glob
import io
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import anyio.from_thread

from clickflow.gcp import first_token, token_of
from clickflow_file.globs import literal_prefix, matches

if TYPE_CHECKING:
    from gcloud.aio.storage import Storage

DOWNLOAD_TIMEOUT = 6 * 3600
"""Seconds a whole download may take (gcloud-aio's timeout covers the whole response)."""


def split(uri: str) -> tuple[str, str]:
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    return bucket, name


async def list_matching(storage: Storage, uri: str) -> list[str]:
    """``gs://`` URIs of the objects a pattern names, sorted; an unmatched pattern is an error."""
    bucket, name = split(uri)
    if not glob.has_magic(name):
        await storage.download_metadata(bucket, name)  # raises if missing
        return [uri]
    prefix = literal_prefix(name)
    found, token = [], None
    while True:
        params = {"prefix": prefix, **({"pageToken": token} if token else {})}
        page: dict[str, Any] = await storage.list_objects(bucket, params=params)
        found += [item["name"] for item in page.get("items", []) if matches(name, item["name"])]
        token = page.get("nextPageToken")
        if not token:
            break
    if not found:
        raise FileNotFoundError(f"no object matches {uri!r}")
    return [f"gs://{bucket}/{m}" for m in sorted(found)]


class DownloadStream(io.RawIOBase):
    """A download as a blocking raw stream, for a worker thread of the source's event loop."""

    def __init__(self, response: Any) -> None:
        self._response = response
        self._read = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = anyio.from_thread.run(self._response.read, len(buffer))
        buffer[: len(data)] = data
        self._read += len(data)
        return len(data)

    def tell(self) -> int:
        return self._read


@asynccontextmanager
async def storage(service_file: str | None) -> AsyncIterator[Storage]:
    try:
        from gcloud.aio.storage import Storage
    except ImportError as exc:
        raise RuntimeError("gs:// input needs: pip install 'clickflow[gcp]'") from exc
    async with Storage(service_file=service_file) as client:
        await first_token(token_of(client), "STORAGE_EMULATOR_HOST")
        yield client


@asynccontextmanager
async def download(storage: Storage, uri: str) -> AsyncIterator[DownloadStream]:
    """The object's bytes as stored (a gzip'd object stays gzip'd on the way)."""
    bucket, name = split(uri)
    headers = {"Accept-Encoding": "gzip"}
    response = await storage.download_stream(bucket, name, headers=headers, timeout=DOWNLOAD_TIMEOUT)
    async with response:  # releases the connection
        yield DownloadStream(response)
