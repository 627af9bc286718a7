"""The ``file`` source: visits from local files (JSON lines or a JSON array, optionally .gz)."""

from __future__ import annotations

import glob
import os
from collections.abc import Callable, Iterator

import anyio
from pydantic import Field, PositiveInt

from clickflow.api import Message, NoAck, Source, SourceContext, SourceOptions
from clickflow.hookspecs import hookimpl
from clickflow_file.reader import CountingReader, first_significant_byte, iter_array, iter_lines


class FileSourceOptions(SourceOptions):
    path: str | list[str] = Field(description="A path, a glob (** allowed), or a list of them.")
    batch_size: PositiveInt = 1000
    """Messages per batch handed to the parser."""


def expand_paths(patterns: str | list[str]) -> list[str]:
    """Every file the patterns name, in order, each once; an unmatched pattern is an error."""
    files: list[str] = []
    for pattern in [patterns] if isinstance(patterns, str) else patterns:
        if pattern.startswith("gs://"):
            raise ValueError(f"{pattern}: gs:// input is not supported by this version")
        if glob.has_magic(pattern):
            matched = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matched:
                raise FileNotFoundError(f"no file matches {pattern!r}")
            files.extend(matched)
        elif os.path.isfile(pattern):
            files.append(pattern)
        else:
            raise FileNotFoundError(f"{pattern!r} does not exist or is not a file")
    return list(dict.fromkeys(os.path.abspath(f) for f in files))


class FileSource(Source):
    """Reads each file once, streaming, and ends when all are read."""

    type_name = "file"
    Options = FileSourceOptions
    options: FileSourceOptions

    async def run(self, context: SourceContext) -> None:
        files = await anyio.to_thread.run_sync(expand_paths, self.options.path)
        done_bytes = 0
        for done, path in enumerate(files):
            reader = await anyio.to_thread.run_sync(CountingReader, path)
            try:
                batches = self._batches(reader, path)
                while batch := await anyio.to_thread.run_sync(_next_or_empty, batches):
                    await context.emit(batch, NoAck())
                    context.progress(files_done=done, files_total=len(files), bytes_read=done_bytes + reader.bytes_read)
                done_bytes += reader.bytes_read
            finally:
                reader.close()
            context.progress(files_done=done + 1, files_total=len(files), bytes_read=done_bytes)

    def _batches(self, reader: CountingReader, path: str) -> Iterator[list[Message]]:
        read: Callable[..., Iterator[tuple[str, bytes]]]
        read = iter_array if first_significant_byte(reader.stream) == b"[" else iter_lines
        batch: list[Message] = []
        for message_id, data in read(reader.stream, path):
            batch.append(Message(data, message_id))
            if len(batch) >= self.options.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def _next_or_empty(batches: Iterator[list[Message]]) -> list[Message]:
    return next(batches, [])


@hookimpl
def register_sources(register: Callable[[type[Source]], None]) -> None:
    register(FileSource)
