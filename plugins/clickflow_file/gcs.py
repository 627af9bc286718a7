"""``gs://`` input for the ``file`` source: listing by glob, and streaming reads.

Objects are listed under the pattern's literal prefix and matched like local
globs (``*`` and ``?`` stay within one path segment, ``**`` crosses them).
A download is read as it arrives: the source's reader runs in a worker thread
and pulls each chunk from the event loop, so memory stays constant whatever
the object's size. ``STORAGE_EMULATOR_HOST`` points at an emulator.
"""

from __future__ import annotations

import io
import re
from typing import TYPE_CHECKING, Any

import anyio.from_thread

if TYPE_CHECKING:
    from gcloud.aio.storage import Storage

DOWNLOAD_TIMEOUT = 6 * 3600
"""Seconds a whole download may take (gcloud-aio's timeout covers the whole response)."""


def split(uri: str) -> tuple[str, str]:
    bucket, _, name = uri.removeprefix("gs://").partition("/")
    return bucket, name


def glob_regex(pattern: str) -> re.Pattern[str]:
    parts = re.split(r"(\*\*|\*|\?)", pattern)
    wildcard = {"**": ".*", "*": "[^/]*", "?": "[^/]"}
    return re.compile("".join(wildcard.get(p, re.escape(p)) for p in parts) + r"\Z")


def has_magic(pattern: str) -> bool:
    return any(c in pattern for c in "*?")


async def list_matching(storage: Storage, uri: str) -> list[str]:
    """``gs://`` URIs of the objects a pattern names, sorted; an unmatched pattern is an error."""
    bucket, name = split(uri)
    if not has_magic(name):
        await storage.download_metadata(bucket, name)  # raises if missing
        return [uri]
    prefix = re.split(r"[*?]", name, maxsplit=1)[0]
    matches, regex, token = [], glob_regex(name), None
    while True:
        params = {"prefix": prefix, **({"pageToken": token} if token else {})}
        page: dict[str, Any] = await storage.list_objects(bucket, params=params)
        matches += [item["name"] for item in page.get("items", []) if regex.match(item["name"])]
        token = page.get("nextPageToken")
        if not token:
            break
    if not matches:
        raise FileNotFoundError(f"no object matches {uri!r}")
    return [f"gs://{bucket}/{m}" for m in sorted(matches)]


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


async def open_download(storage: Storage, uri: str) -> tuple[DownloadStream, Any]:
    """The object's bytes as stored (a gzip'd object stays gzip'd on the way), and the response
    to leave (``__aexit__``) afterwards."""
    bucket, name = split(uri)
    headers = {"Accept-Encoding": "gzip"}
    response = await storage.download_stream(bucket, name, headers=headers, timeout=DOWNLOAD_TIMEOUT)
    return DownloadStream(response), response
