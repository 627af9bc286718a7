"""Streaming readers for visit files: JSON lines or one JSON array, optionally gzip'd (detected
by content, so a gzip'd object without ``.gz`` in its name reads too).

Both yield ``(message_id, raw_bytes)`` pairs in constant memory. Message ids are
``PATH:LINE`` for JSON lines and ``PATH:[INDEX]`` for arrays, so a re-run of
the same file produces the same ids (and so the same row ids). Nothing in a file is
skipped: what follows an array's closing bracket is read on as JSON lines, and an
element that ``json``'s scanner cannot read (malformed, or nested too deeply) is still
cut out whole, for the parser to dead-letter.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import logging
import re
import zlib
from collections.abc import Iterator
from typing import Any, BinaryIO, Protocol

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
    """``(message id, bytes)`` of each visit in a file: a JSON array's elements, or else its lines.

    A file that cannot be read to its end (a gzip stream cut short or corrupt, a read error) raises
    ``OSError`` naming the file and how far it was read, whatever the error underneath."""
    count = 0
    try:
        read = iter_array if first_significant_byte(stream) == b"[" else iter_lines
        for message in read(stream, path):
            yield message
            count += 1
    except (OSError, EOFError, zlib.error) as exc:
        raise OSError(f"{path}: unreadable after {count} messages: {exc}") from exc


class _Lines(Protocol):
    def readline(self, size: int = -1, /) -> bytes: ...


def iter_lines(stream: _Lines, path: str, first_line: int = 1) -> Iterator[tuple[str, bytes]]:
    """Each non-blank line; one longer than ``MAX_ELEMENT`` is cut there (the parser dead-letters
    it as too large) and the rest of it skipped, so memory stays bounded."""
    number = first_line - 1
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

    An element that ``json`` cannot read (malformed, or nested past its recursion
    limit) is cut out by counting brackets outside strings: up to its closing
    bracket, or, if it does not start with one, up to the array's next comma or
    closing bracket. The parser dead-letters it, and reading goes on after it; an
    element that follows another without a comma is read as one of its own. One
    longer than ``MAX_ELEMENT`` is cut there, as a line is, and the rest of it
    skipped. One whose brackets never balance (cut short, or a string left open)
    ends before the comma at the end of a line if the next line starts the next
    element (see ``_Resync``); failing that, it ends the file: what is left (up to
    ``MAX_REMAINDER``) becomes one final message, which the parser turns into a dead
    letter. What follows the closing bracket (a
    JSON-lines file whose first line is an array, files joined together) is read on
    as JSON lines, numbered from the line the array ends on.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
    buf, pos, eof, index = "", 0, False, 0
    newlines = 0
    """Line ends in the text already dropped from ``buf``."""
    first_column = 0
    """The column ``buf`` starts at."""

    def column(at: int) -> int:
        line_end = buf.rfind("\n", 0, at)
        return at - line_end - 1 if line_end != -1 else first_column + at

    def more() -> bool:
        nonlocal buf, pos, eof, newlines, first_column
        chunk = stream.read(CHUNK)
        eof = not chunk
        newlines += buf.count("\n", 0, pos)
        first_column = column(pos)
        buf = buf[pos:] + decoder.decode(chunk, final=eof)
        pos = 0
        return not eof

    def lines_after() -> Iterator[tuple[str, bytes]]:
        rest = buf[pos:].encode("utf-8", "surrogateescape") + decoder.getstate()[0]
        line = newlines + buf.count("\n", 0, pos) + 1
        return iter_lines(_Prefixed(rest, stream), path, first_line=line)

    def skip_whitespace() -> bool:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in _WHITESPACE:
                pos += 1
            if pos < len(buf) or not more():
                return pos < len(buf)

    def skip_rest(extent: _Extent) -> tuple[tuple[str, bytes], bool]:
        """The element at ``pos``, longer than ``MAX_ELEMENT``, as its first ``MAX_ELEMENT`` + 1 bytes;
        the rest of it is read and dropped. Whether it ended: if so, ``pos`` is past it; if not, the
        file ended first."""
        nonlocal pos
        head = buf[pos : pos + MAX_ELEMENT + 1].encode("utf-8", "surrogateescape")[: MAX_ELEMENT + 1]
        skipped, end = -len(head), -1
        while end == -1:
            counted = extent.forget()
            skipped += _utf8_size(buf[pos : pos + counted])
            pos += counted
            if not more():
                break
            end = extent.end(buf, pos)
        skipped += _utf8_size(buf[pos:end] if end != -1 else buf[pos:])
        _cut(path, index, skipped, ended=end != -1)
        pos = end if end != -1 else len(buf)
        return (f"{path}:[{index}]", head), end != -1

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
            pos += 1
            yield from lines_after()
            return
        if not expect_element:
            expect_element = True
            if char == ",":
                pos += 1
                continue
            log.warning("%s: no comma before array element %d; read as an element of its own", path, index)
        extent: _Extent | None = None
        resync: _Resync | None = None
        while True:
            try:
                end = extent.end(buf, pos) if extent else _scan(buf, pos)[1]
            except (json.JSONDecodeError, RecursionError):  # malformed, too deep, or cut off by the buffer
                extent, resync = _Extent(bracketed=char in "[{"), _Resync(column(pos))
                end = extent.end(buf, pos)
            if resync is not None and (cut := resync.find(buf, pos, end, eof)) != -1:
                end = cut
                break
            if (end == -1 or end == len(buf)) and not eof and len(buf) - pos < MAX_ELEMENT:
                more()
                continue
            break
        if end == -1 and extent is not None and not eof:  # longer than MAX_ELEMENT
            message, ended = skip_rest(extent)
            yield message
            if not ended:
                return
        elif end == -1:
            yield remainder()
            return
        else:
            element = buf[pos:end].encode("utf-8", "surrogateescape")
            if len(element) > MAX_ELEMENT:
                _cut(path, index, len(element) - MAX_ELEMENT - 1, ended=True)
            yield f"{path}:[{index}]", element[: MAX_ELEMENT + 1]
            pos = end
        index, expect_element = index + 1, False
    yield remainder()  # truncated: the closing bracket never came


def _cut(path: str, index: int, skipped: int, ended: bool) -> None:
    log.warning("%s: array element %d is over %d bytes; %d more bytes of it skipped%s", path, index, MAX_ELEMENT,
                skipped, "" if ended else " (the file ends in it)")  # fmt: skip


def _utf8_size(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape"))


class _Prefixed:
    """Bytes already read from a stream, then the rest of the stream, line by line."""

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        self._head = io.BytesIO(head)
        self._stream = stream

    def readline(self, size: int = -1, /) -> bytes:
        line = self._head.readline(size)
        if line.endswith(b"\n") or 0 <= size <= len(line):
            return line
        return line + self._stream.readline(size - len(line) if size >= 0 else -1)


_scan = json.JSONDecoder().raw_decode
_NEXT_LINE_OBJECT = re.compile(r",[ \t\r]*\n(?:[ \t\r]*\n)*([ \t]*)(?=\{)")
"""A comma that ends a line, and the indentation of the next line that is not blank, if it starts
with an object."""
_LOOK_AHEAD = 1 << 20
"""How much text an object at the start of a line may need before it is judged."""
_MAX_TRIES = 100
"""Lines judged per broken element at most: a hostile one of lines that each open one more
bracket made ``json`` read a thousand lines for each (15 s a megabyte)."""


class _Resync:
    """Where an array element that ``json``'s scanner cannot read ends if its brackets do not
    balance (one cut short, or with a string left open): before the comma at the end of a line
    whose next line, no more indented than the element's first, starts a whole object followed by
    a comma or the array's closing bracket. An array written one element per line, or indented,
    goes on there, so a broken element does not take what follows it along. ``find`` is called
    again, with more text, while it finds nothing."""

    def __init__(self, column: int) -> None:
        self._column = column
        self._scanned = 0
        """How far past the element's start the text is searched."""
        self._tries = _MAX_TRIES

    def find(self, buf: str, start: int, end: int, eof: bool) -> int:
        """The index in ``buf`` where the element at ``start`` ends, if a line before ``end`` (the
        end its brackets give, or -1) starts the next element; else -1."""
        at, stop = start + self._scanned, len(buf) if end == -1 else end
        while self._tries and (match := _NEXT_LINE_OBJECT.search(buf, at, stop)) is not None:
            if len(match.group(1)) <= self._column:
                try:
                    after = _scan(buf, match.end())[1]
                except (json.JSONDecodeError, RecursionError):
                    if not eof and len(buf) - match.end() < _LOOK_AHEAD:
                        break  # perhaps cut off by the buffer: judged again with more text
                else:
                    while after < len(buf) and buf[after] in _WHITESPACE:
                        after += 1
                    if after < len(buf) and buf[after] in ",]":
                        return start + len(buf[start : match.start()].rstrip(_WHITESPACE))
                    if after == len(buf) and not eof:
                        break
                self._tries -= 1
            at = match.start() + 1
        else:  # a match may begin at a last comma that only whitespace follows, and end in text not read yet
            last = buf.rfind(",", at, stop)
            at = last if last != -1 and not buf[last + 1 : stop].strip(_WHITESPACE) else stop
        self._scanned = at - start
        return -1


_BRACKETS_OR_QUOTE = re.compile(r'[\[{]+|[\]}]+|"')
"""A run of opening brackets, a run of closing ones, or a string's opening quote."""
_COMMA_BRACKET_OR_QUOTE = re.compile(r'[\[\]{}",]')
"""What ends an element that does not start with a bracket: a comma or closing bracket outside
brackets and strings; brackets and quotes are counted on the way."""
_IN_STRING = re.compile(r'(?:[^"\\]++|\\.)*+', re.DOTALL)
"""A string's characters: up to its closing quote, or where the text ends (before a lone backslash)."""


class _Extent:
    """Where an array element that ``json``'s scanner cannot read ends, found by counting
    brackets outside strings: at its closing bracket if it starts with one (``bracketed``), else
    before the comma or closing bracket that follows it. ``end`` is called again, with more text,
    while the element is cut off.

    It does not check the element: that is the parser's, which dead-letters it (as malformed, or
    as too deep)."""

    def __init__(self, bracketed: bool) -> None:
        self._bracketed = bracketed
        self._tokens = _BRACKETS_OR_QUOTE if bracketed else _COMMA_BRACKET_OR_QUOTE
        self._scanned = 0
        """How far past the value's start the text is counted."""
        self._depth = 0
        self._in_string = False

    def forget(self) -> int:
        """How far the text is counted from the value's start, which moves there: the text before
        it is not read again, so a caller may drop it."""
        counted, self._scanned = self._scanned, 0
        return counted

    def end(self, buf: str, start: int) -> int:
        """The index in ``buf`` just past the value at ``start``, or -1 if ``buf`` ends first."""
        at, depth, in_string = start + self._scanned, self._depth, self._in_string
        while True:
            if in_string:
                at = _IN_STRING.match(buf, at).end()  # type: ignore[union-attr]  # it matches an empty string
                if at == len(buf) or buf[at] != '"':  # cut off, perhaps before an escape's backslash
                    break
                at, in_string = at + 1, False
            match = self._tokens.search(buf, at)
            if match is None:
                at = len(buf)
                break
            token, at = match.group(), match.end()
            if token == '"':
                in_string = True
            elif token[0] in "[{":
                depth += len(token)
            elif self._bracketed:
                depth -= len(token)
                if depth <= 0:  # closers past the element's own belong to the array
                    return at + depth
            elif depth == 0 and token in ",]":  # the array's: the element ends before it
                return start + len(buf[start : match.start()].rstrip(_WHITESPACE))
            elif depth > 0 and token in "]}":
                depth -= 1
        self._scanned, self._depth, self._in_string = at - start, depth, in_string
        return -1
