"""Streaming readers for visit files: JSON lines or one JSON array, optionally compressed with
gzip, bzip2 or xz (detected by content, so a gzip'd object without ``.gz`` in its name reads too),
in UTF-8, or in UTF-16 or UTF-32 with a byte-order mark (read as UTF-8).

Both yield ``(place, raw_bytes)`` pairs in constant memory: ``PATH:LINE`` for JSON lines,
``PATH:[INDEX]`` for arrays. ``with_content_ids`` makes a message's id of its place and its
content, so a re-run of the same file produces the same ids (and so the same row ids), and a file
rewritten in place new ones where it changed. Nothing in a file is
skipped: what follows an array's closing bracket is read on as JSON lines, and an
element that ``json``'s scanner cannot read (malformed, or nested too deeply) is still
cut out whole, for the parser to dead-letter.
"""

from __future__ import annotations

import bz2
import codecs
import gzip
import io
import json
import logging
import lzma
import os
import select
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any, BinaryIO, Protocol

from clickflow.api import content_id
from clickflow.logs import describe
from clickflow_file.elements import Extent, Resync, next_character, past_whitespace, scan

log = logging.getLogger(__name__)

CHUNK = 1 << 20
MAX_ELEMENT = 64 << 20
"""An array element larger than this is treated as malformed rather than read on."""
MAX_REMAINDER = 16 << 20
"""How much of a malformed array's unread rest goes into its dead letter."""
DECOMPRESSED: tuple[tuple[bytes, Callable[[BinaryIO], Any]], ...] = (
    (b"\x1f\x8b", lambda stream: gzip.GzipFile(fileobj=stream)),
    (b"BZh", bz2.BZ2File),
    (b"\xfd7zXZ\x00", lzma.LZMAFile),
)
"""Each compression a file is read through, by the magic number it starts with."""
UNREAD_COMPRESSIONS = ((b"\x28\xb5\x2f\xfd", "zstd"),)
"""Formats clickflow does not decompress (no compressor in the standard library): such a file
fails the run naming its format, rather than become a dead letter per line of binary."""
DAMAGE = (OSError, EOFError, zlib.error, lzma.LZMAError)
"""What a damaged file raises as it is read: the read error, or the decompressor's."""


BYTE_ORDER_MARKS = (  # UTF-32 LE's starts with UTF-16 LE's
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class CountingReader:
    """Reads a byte stream, decompressing it if it starts like gzip, bzip2 or xz, transcoding it to
    UTF-8 if it starts with a UTF-16 or UTF-32 byte-order mark (and skipping UTF-8's), and counts
    the bytes read from it (compressed)."""

    def __init__(self, raw: Any, path: str) -> None:
        """Owns ``raw`` (``close()`` closes it); ``path`` names it in errors: a stream whose first
        bytes cannot be read (a gzip header cut short or corrupt) is closed and raises ``OSError``,
        as ``iter_messages`` does for the rest."""
        self._raw = raw
        buffered = raw if hasattr(raw, "peek") else io.BufferedReader(raw, CHUNK)
        try:
            start = buffered.peek(6)[:6]
            for magic, name in UNREAD_COMPRESSIONS:
                if start.startswith(magic):
                    raise OSError(f"compressed with {name}, which clickflow does not read: decompress it, or gzip it")
            opener = next((opener for magic, opener in DECOMPRESSED if start.startswith(magic)), None)
            # the decompressors' own buffers are 8 KiB: a line at a time through them costs a third more
            stream = io.BufferedReader(opener(buffered), CHUNK) if opener else buffered
            head = stream.peek(4)[:4]
        except DAMAGE as exc:
            raw.close()
            raise unreadable(path, 0, exc) from exc
        for mark, encoding in BYTE_ORDER_MARKS:
            if head.startswith(mark):
                stream = io.BufferedReader(_AsUtf8(stream, encoding), CHUNK)
                break
        else:
            if head.startswith(codecs.BOM_UTF8):  # as Windows PowerShell 5.1's `Out-File -Encoding utf8` writes
                stream.read(len(codecs.BOM_UTF8))
        self.stream: BinaryIO = stream
        self.trickles = isinstance(raw, Stdin) and stream is buffered
        """Whether ``waits`` can tell (standard input, neither compressed nor transcoded)."""

    @classmethod
    def open(cls, path: str) -> CountingReader:
        # the default buffer, 4 KiB, is a read call every few lines
        return cls(open(path, "rb", buffering=CHUNK), path)

    @property
    def bytes_read(self) -> int:
        return int(self._raw.tell())

    def waits(self, linger: float = 0.0) -> bool:
        """Whether reading on would wait for input: every byte that came is read, and no more is
        ready, after ``linger`` seconds for more to come (slept whole: waking for every line of a
        producer that writes a line at a time cost as much as the lines). Where ``trickles``."""
        if self._raw.tell() != self.stream.tell() or self._raw.ready():
            return False
        if linger > 0:
            time.sleep(linger)
        return not self._raw.ready()

    def close(self) -> None:
        """The raw stream first: a thread still reading standard input (a run stopped while it
        waited for input) holds the buffer's lock until its read ends, which closing ``Stdin`` does."""
        self._raw.close()
        self.stream.close()


STDIN = "-"
"""The path that names standard input."""


class Stdin(io.RawIOBase):
    """Standard input, read as it comes and counted as read (a pipe cannot ``tell()``). A read
    waits at most ``POLL`` seconds at a time, so that ``close()``, from another thread, ends one
    that is waiting for input: a thread cannot be cancelled, and one left reading would keep the
    process from exiting."""

    POLL = 0.1

    def __init__(self, fd: int = 0) -> None:
        if os.isatty(fd):
            raise OSError(f"path {STDIN!r} reads standard input, which is a terminal: pipe visits in, e.g. "
                          "clickflow simulate --count 100 | clickflow run PIPELINE")  # fmt: skip
        self._fd = fd
        self._count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self.closed:
                raise ValueError("standard input was closed while a read waited for it")
            if select.select([self._fd], [], [], self.POLL)[0]:
                break
        size = os.readv(self._fd, [buffer])
        self._count += size
        return size

    def tell(self) -> int:
        return self._count

    def ready(self) -> bool:
        """Whether a read would return at once (with bytes, or at the end)."""
        return bool(select.select([self._fd], [], [], 0)[0])


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


class _AsUtf8(io.RawIOBase):
    """A stream of text in UTF-16 or UTF-32 (the codec reads its byte-order mark), as UTF-8. Lone
    surrogates pass through, and bytes left at the end that are not a whole character are kept as
    they are: either makes its message invalid UTF-8, for the parser to dead-letter."""

    def __init__(self, stream: _Readable, encoding: str) -> None:
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder(encoding)("surrogatepass")
        self._encoded = b""
        self._at = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._at == len(self._encoded):
            raw = self._stream.read(CHUNK)
            try:
                text = self._decoder.decode(raw, final=not raw)
            except UnicodeDecodeError:  # the stream ends inside a character
                self._encoded, self._at = self._decoder.getstate()[0], 0
                self._decoder.reset()
                break
            self._encoded, self._at = text.encode("utf-8", "surrogatepass"), 0
            if not raw:
                break
        size = min(len(buffer), len(self._encoded) - self._at)
        buffer[:size] = self._encoded[self._at : self._at + size]
        self._at += size
        return size


def first_significant_byte(stream: BinaryIO) -> bytes:
    """Peek past leading whitespace without consuming it."""
    head = stream.peek(4096)[:4096] if hasattr(stream, "peek") else b""
    return head.lstrip()[:1]


def iter_messages(stream: BinaryIO, path: str) -> Iterator[tuple[str, bytes]]:
    """``(message id, bytes)`` of each visit in a file: a JSON array's elements, or else its lines.

    A file that cannot be read to its end (a compressed stream cut short or corrupt, a read error) raises
    ``OSError`` naming the file and how far it was read, whatever the error underneath."""
    count = 0
    try:
        read = iter_array if first_significant_byte(stream) == b"[" else iter_lines
        for message in read(stream, path):
            yield message
            count += 1
    except DAMAGE as exc:
        raise unreadable(path, count, exc) from exc


def with_content_ids(messages: Iterable[tuple[str, bytes]]) -> Iterator[tuple[str, bytes]]:
    """Each message with an id of its place and its content (``clickflow.api.content_id``)."""
    for place, data in messages:
        yield content_id(place, data), data


def batched(
    messages: Iterable[tuple[str, bytes]], size: int, max_bytes: int, cut: Callable[[bool], bool] | None = None
) -> Iterator[list[tuple[str, bytes]]]:
    """``(id, bytes)`` messages in batches of ``size`` messages or ``max_bytes``, whichever comes
    first, or sooner where ``cut(first)`` says so, asked after each message (``first``: it began its
    batch). The file source's (which cuts where standard input pauses) and Beam's."""
    batch: list[tuple[str, bytes]] = []
    held = 0
    for message in messages:
        batch.append(message)
        held += len(message[1])
        if len(batch) >= size or held >= max_bytes or (cut is not None and cut(len(batch) == 1)):
            yield batch
            batch, held = [], 0
    if batch:
        yield batch


def unreadable(path: str, count: int, exc: BaseException) -> OSError:
    return OSError(f"{path}: unreadable after {count} messages: {describe(exc)}")


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
    skipped. One whose brackets never balance (cut short, or a string left open:
    where they do, no comma or closing bracket follows) ends before the comma before
    the object that starts the next element (see ``Resync``); failing that, it ends
    the file: what is left (up to ``MAX_REMAINDER``) becomes one final message, which
    the parser turns into a dead letter. A closing bracket that a comma or another
    closer follows is a broken element's, not the array's, if a next element is
    found so. What follows the array's closing bracket (a JSON-lines file whose
    first line is an array, files joined together) is read on as JSON lines,
    numbered from the line the array ends on.
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
            pos = past_whitespace(buf, pos)
            if pos < len(buf) or not more():
                return pos < len(buf)

    def skip_rest(extent: Extent) -> tuple[tuple[str, bytes], bool]:
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
        skipped = len(rest) - MAX_REMAINDER
        log.warning("%s: malformed JSON array at element %d; its rest goes to dead_letter%s", path, index,
                    f" (its first {MAX_REMAINDER} bytes; {skipped} more skipped)" if skipped > 0 else "")  # fmt: skip
        return f"{path}:[{index}]", rest[:MAX_REMAINDER]

    def stray_closer() -> int:
        """-1 if the bracket at ``pos`` closes the array; else where the next element starts. One that
        a comma or another closer follows closes what a broken element left open: if a later
        element is found (as after an element whose brackets never balance: ``Resync``), the text
        up to it is an element of its own."""
        while (follows := next_character(buf, pos + 1)) is None and more():
            pass
        if follows not in (",", "]", "}", ":"):
            return -1
        resync = Resync(column(pos))
        while (cut := resync.find(buf, pos, -1, eof)) == -1 and not eof and len(buf) - pos < MAX_ELEMENT:
            more()
        return cut

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
            cut = stray_closer()
            if cut == -1:
                pos += 1
                yield from lines_after()
                return
            log.warning("%s: a closing bracket before array element %d is not the array's; read as an element", path,
                        index)  # fmt: skip
            yield f"{path}:[{index}]", buf[pos:cut].encode("utf-8", "surrogateescape")
            pos, index = cut, index + 1
            continue
        if not expect_element:
            expect_element = True
            if char == ",":
                pos += 1
                continue
            log.warning("%s: no comma before array element %d; read as an element of its own", path, index)
        extent: Extent | None = None
        resync: Resync | None = None
        while True:
            try:
                end = extent.end(buf, pos) if extent else scan(buf, pos)[1]
            except (json.JSONDecodeError, RecursionError):  # malformed, too deep, or cut off by the buffer
                extent, resync = Extent(bracketed=char in "[{"), Resync(column(pos))
                end = extent.end(buf, pos)
            # a broken element's end by its brackets stands if the array goes on after it
            follows = next_character(buf, end) if resync is not None and end != -1 else None
            unknown = end == -1 or end == len(buf) or (resync is not None and follows is None)
            if unknown and not eof and len(buf) - pos < MAX_ELEMENT:
                more()
                continue
            if resync is not None and follows not in (",", "]") and (cut := resync.find(buf, pos, end, eof)) != -1:
                end = cut
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
