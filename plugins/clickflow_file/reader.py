"""Streaming readers for visit files: JSON lines or one JSON array, optionally gzip'd (detected
by content, so a gzip'd object without ``.gz`` in its name reads too).

Both yield ``(message_id, raw_bytes)`` pairs in constant memory. Message ids are
``PATH:LINE`` for JSON lines and ``PATH:[INDEX]`` for arrays, so a re-run of
the same file produces the same ids (and so the same row ids).
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import logging
from collections.abc import Iterator
from typing import Any, BinaryIO

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_ELEMENT = 64 << 20
"""An array element larger than this is treated as malformed rather than read on."""
MAX_REMAINDER = 16 << 20
"""How much of a malformed array's unread rest goes into its dead letter."""
_WHITESPACE = " \t\r\n"
GZIP_MAGIC = b"\x1f\x8b"


class CountingReader:
    """Reads a byte stream, gunzipping it if it starts like gzip, and counts the bytes read from it."""

    def __init__(self, raw: Any) -> None:
        self._raw = raw
        buffered = raw if hasattr(raw, "peek") else io.BufferedReader(raw, CHUNK)
        gzipped = buffered.peek(2)[:2] == GZIP_MAGIC
        self.stream: BinaryIO = gzip.GzipFile(fileobj=buffered) if gzipped else buffered  # type: ignore[assignment]

    @classmethod
    def open(cls, path: str) -> CountingReader:
        return cls(open(path, "rb"))

    @property
    def bytes_read(self) -> int:
        return int(self._raw.tell())

    def close(self) -> None:
        self.stream.close()
        self._raw.close()


def first_significant_byte(stream: BinaryIO) -> bytes:
    """Peek past leading whitespace (and a UTF-8 BOM) without consuming it."""
    head = stream.peek(4096)[:4096] if hasattr(stream, "peek") else b""
    stripped = head.removeprefix(codecs.BOM_UTF8).lstrip()
    return stripped[:1]


def iter_messages(stream: BinaryIO, path: str) -> Iterator[tuple[str, bytes]]:
    """``(message id, bytes)`` of each visit in a file: a JSON array's elements, or else its lines."""
    read = iter_array if first_significant_byte(stream) == b"[" else iter_lines
    return read(stream, path)


def iter_lines(stream: BinaryIO, path: str) -> Iterator[tuple[str, bytes]]:
    """Each non-blank line; one longer than ``MAX_ELEMENT`` is cut there (the parser dead-letters
    it as too large) and the rest of it skipped, so memory stays bounded."""
    number = 0
    while line := stream.readline(MAX_ELEMENT + 1):
        number += 1
        if len(line) > MAX_ELEMENT and not line.endswith(b"\n"):
            skipped = 0
            while (rest := stream.readline(CHUNK)) and not rest.endswith(b"\n"):
                skipped += len(rest)
            log.warning("%s:%d: a line over %d bytes; %d more bytes of it skipped", path, number, MAX_ELEMENT,
                        skipped + len(rest))  # fmt: skip
        line = line.strip()
        if line:
            yield f"{path}:{number}", line


def iter_array(stream: BinaryIO, path: str) -> Iterator[tuple[str, bytes]]:
    """Each element of a top-level JSON array as its original bytes.

    A malformed element ends the file: what is left (up to ``MAX_REMAINDER``)
    becomes one final message, which the parser turns into a dead letter.
    """
    decode = codecs.getincrementaldecoder("utf-8")("surrogateescape").decode
    scan = json.JSONDecoder().raw_decode
    buf, pos, eof, index = "", 0, False, 0

    def more() -> bool:
        nonlocal buf, pos, eof
        chunk = stream.read(CHUNK)
        eof = not chunk
        buf = buf[pos:] + decode(chunk, final=eof)
        pos = 0
        return not eof

    def skip_whitespace() -> bool:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _WHITESPACE:
                pos += 1
            if pos < len(buf) or not more():
                return pos < len(buf)

    def remainder() -> tuple[str, bytes]:
        rest = buf[pos:].encode("utf-8", "surrogateescape")
        rest += stream.read(max(0, MAX_REMAINDER - len(rest)))
        log.warning("%s: malformed JSON array at element %d; its rest goes to dead_letter", path, index)
        return f"{path}:[{index}]", rest[:MAX_REMAINDER]

    if not skip_whitespace():
        return
    if buf.startswith("\ufeff", pos):
        pos += 1
        skip_whitespace()
    if buf[pos] != "[":
        yield remainder()
        return
    pos += 1
    expect_element = True
    while skip_whitespace():
        char = buf[pos]
        if char == "]" and (index == 0 or not expect_element):
            return
        if not expect_element:
            if char != ",":
                yield remainder()
                return
            pos += 1
            expect_element = True
            continue
        while True:
            try:
                _, end = scan(buf, pos)
            except json.JSONDecodeError:
                end = -1
            if (end == -1 or end == len(buf)) and not eof and len(buf) - pos < MAX_ELEMENT:
                more()
                continue
            break
        if end == -1:
            yield remainder()
            return
        yield f"{path}:[{index}]", buf[pos:end].encode("utf-8", "surrogateescape")
        pos, index, expect_element = end, index + 1, False
    yield remainder()  # truncated: the closing bracket never came
