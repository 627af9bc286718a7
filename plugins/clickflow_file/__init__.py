"""The ``file`` source: visits from files, local or ``gs://`` (JSON lines or a JSON array, optionally gzip'd),
or from standard input (``-``), read to its end.

``gs://`` input needs the ``gcp`` extra (gcloud-aio-storage); see ``gcs``.
"""

from __future__ import annotations

import glob
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import anyio

from clickflow.api import AnySource, Message, NoAck, Source, SourceContext, valid_text
from clickflow.hookspecs import Register, hookimpl
from clickflow.options import GCS_BUCKET, ByteSize, PositiveInt, SourceOptions, check_range
from clickflow_file import globs
from clickflow_file.reader import STDIN, CountingReader, Stdin, batched, iter_messages, with_content_ids

LINGER_S = 0.05
"""How long a batch from standard input waits for more when the input pauses: a producer that
writes a line at a time at 5,000 lines a second made as many batches, 1.3 cores' worth of CPU."""
STDIN_NAME = "stdin"
"""Standard input's name in message ids (``stdin:LINE#FINGERPRINT``) and errors."""
_GS_OBJECTS = re.compile(rf"gs://{GCS_BUCKET}/.")
"""A ``gs://`` path with a bucket, then an object's name or glob."""


class FileSourceOptions(SourceOptions, kw_only=True):
    path: str | list[str]
    """A path, a glob (** allowed), gs://bucket/glob, ``-`` for standard input, or a list of them."""
    batch_size: PositiveInt = 1000
    """Messages per batch handed to the parser."""
    batch_bytes: ByteSize = ByteSize(16 << 20)
    """A batch also ends once its messages reach this many bytes: what a run holds at once (a
    batch in each stage and ``runtime.channel_capacity`` between them) stays bounded whatever the
    visits' sizes. At least 1 MiB; a single message larger than it is a batch of its own."""
    service_file: str | None = None
    """Service-account key for gs://; default: ADC."""

    def __post_init__(self) -> None:
        """What ``run`` would only find out after the sinks opened: no path, an empty one, or a
        ``gs://`` one without a bucket and an object's name (or glob) in it."""
        check_range("batch_bytes", self.batch_bytes, 1 << 20, 1 << 30)
        patterns = self.patterns()
        if not patterns:
            raise ValueError("path names nothing to read: give a path, a glob, gs://bucket/glob or a list of them")
        for pattern in patterns:
            if not pattern.strip():
                raise ValueError("path has an empty entry (an unset variable?)")
            if pattern.startswith("gs://") and not _GS_OBJECTS.match(pattern):
                raise ValueError(f"path {pattern!r} is not gs://BUCKET/NAME: a bucket, then an object's name or glob")

    def patterns(self) -> list[str]:
        return [self.path] if isinstance(self.path, str) else self.path


def expand_local(pattern: str) -> list[str]:
    """Every local file a pattern names, sorted; an unmatched pattern is an error."""
    if glob.has_magic(pattern):
        if "**" in pattern.split("/"):  # not glob's: it follows links round a loop (see globs)
            top = os.path.dirname(globs.literal_prefix(pattern))
            matched = sorted(p for p in globs.files_under(top) if globs.matches(pattern, p))
        else:
            matched = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
        if not matched:
            raise FileNotFoundError(f"no file matches {pattern!r}")
        return [os.path.abspath(p) for p in matched]
    if os.path.isfile(pattern):
        return [os.path.abspath(pattern)]
    if os.path.isdir(pattern):
        example = pattern.rstrip("/") + "/*.jsonl"
        raise FileNotFoundError(f"{pattern!r} is a directory, not a file: name its files, e.g. {example}")
    if os.path.exists(pattern):  # a pipe (/dev/stdin), a socket, a device
        raise FileNotFoundError(
            f"{pattern!r} is not a regular file: the file source reads files, and standard input as {STDIN!r}"
        )
    raise FileNotFoundError(f"{pattern!r} does not exist")


def each_file_once(paths: list[str]) -> list[str]:
    """``paths`` with each file once, in the order first named. A local file named twice (by two
    patterns, through a symbolic link such as ``latest -> 2024-07-01``, or a hard link) is read
    once: its name is part of each message's id, so every other name stored its visits again. It
    keeps the name it has without links if it was named so, else its shortest name (then the
    first in sort order): the same whatever the patterns' order."""
    names: dict[object, list[str]] = {}
    for path in paths:
        names.setdefault(_identity(path), []).append(path)
    return [same[0] if len(same) == 1 else min(same, key=_preferred) for same in names.values()]


def _identity(path: str) -> object:
    if path == STDIN or path.startswith("gs://"):
        return path
    try:
        found = os.stat(path)
    except OSError:  # gone since it was listed: reading it says so
        return path
    return found.st_dev, found.st_ino


def _preferred(path: str) -> tuple[bool, int, str]:
    """A sort key: a name without links first, then the shortest, then the first in order."""
    return os.path.realpath(path) != path, len(path), path


async def expand_paths(patterns: list[str], storage: Any = None) -> list[str]:
    """Every file the patterns name, in order, each once (``storage`` lists ``gs://`` patterns)."""
    files: list[str] = []
    for pattern in patterns:
        if pattern == STDIN:
            files.append(STDIN)
        elif pattern.startswith("gs://"):
            from clickflow_file import gcs  # only for gs:// input: it brings gcloud-aio and anyio's threads

            files += await gcs.list_matching(storage, pattern)
        else:
            files += await anyio.to_thread.run_sync(expand_local, pattern)
    return await anyio.to_thread.run_sync(each_file_once, files)


class FileSource(Source[FileSourceOptions]):
    """Reads each file once, streaming, and ends when all are read."""

    type_name = "file"
    beam = "clickflow_file.beam:ReadFiles"

    @property
    def finite(self) -> bool:
        return True

    async def run(self, context: SourceContext) -> None:
        async with AsyncExitStack() as stack:
            storage: Any = None
            if any(p.startswith("gs://") for p in self.options.patterns()):
                from clickflow_file import gcs

                storage = await stack.enter_async_context(gcs.storage(self.options.service_file))
            files = await expand_paths(self.options.patterns(), storage)
            done_bytes = 0
            for done, path in enumerate(files):
                async with _reader(path, storage) as reader:
                    batches = self._batches(reader, STDIN_NAME if path == STDIN else valid_text(path))
                    # a read of standard input may wait for ever: a stopped run leaves it, and closing
                    # the reader ends it (see reader.Stdin); a file's read ends soon, and is waited for
                    abandon = path == STDIN
                    while batch := await anyio.to_thread.run_sync(_next_or_empty, batches, abandon_on_cancel=abandon):
                        await context.emit(batch, NoAck())
                        progress = done_bytes + reader.bytes_read
                        context.progress(done, len(files), unit="files", bytes_read=progress)
                    done_bytes += reader.bytes_read
                context.progress(done + 1, len(files), unit="files", bytes_read=done_bytes)

    def _batches(self, reader: CountingReader, path: str) -> Iterator[list[Message]]:
        """Batches of ``batch_size`` messages or ``batch_bytes``; from standard input, also whatever
        came before it paused for ``LINGER_S``, so that the visits of a slow producer are stored as
        they come, and those of one that writes a line at a time are not each a batch of their own."""
        started = 0.0

        def paused(first: bool) -> bool:
            nonlocal started
            if first:
                started = time.monotonic()
            return reader.waits(started + LINGER_S - time.monotonic())

        messages = with_content_ids(iter_messages(reader.stream, path))
        cut = paused if reader.trickles else None
        for batch in batched(messages, self.options.batch_size, self.options.batch_bytes, cut):
            yield [Message(data, message_id) for message_id, data in batch]


@asynccontextmanager
async def _reader(path: str, storage: Any) -> AsyncIterator[CountingReader]:
    """A local file or a ``gs://`` object, opened in a thread (opening reads a first chunk)."""
    async with AsyncExitStack() as stack:
        if path.startswith("gs://"):
            from clickflow_file import gcs

            stream = await stack.enter_async_context(gcs.download(storage, path))
            reader = await anyio.to_thread.run_sync(CountingReader, stream, path)
        elif path == STDIN:
            stdin = Stdin()
            stack.callback(stdin.close)  # if the first read is left waiting for input (CountingReader peeks)
            reader = await anyio.to_thread.run_sync(CountingReader, stdin, STDIN_NAME, abandon_on_cancel=True)
        else:
            reader = await anyio.to_thread.run_sync(CountingReader.open, path)
        stack.callback(reader.close)
        yield reader


def _next_or_empty(batches: Iterator[list[Message]]) -> list[Message]:
    return next(batches, [])


@hookimpl
def register_sources(register: Register[AnySource]) -> None:
    register(FileSource)
