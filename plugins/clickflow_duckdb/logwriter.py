"""The batch log's writer: a child process that appends each record to its segment and syncs it.

With ``commit_every`` every batch is one record in the log, appended and fdatasynced before the
batch is acknowledged (see ``log``). In a thread of the run's process the append itself takes
under a millisecond, but under load the event loop holds the GIL most of the time, and handing
it to the thread and back cost about three milliseconds a write. Here the records come over a
pipe and each is answered once it is synced: the event loop never waits for the GIL.

The sink runs this file as a script (``python -P logwriter.py``); it imports only the standard
library. Each request on its standard input is a kind byte, the payload's length (8 bytes,
little-endian) and the payload:
- ``O`` and a path: start a new segment there, closing the last, and sync its directory;
- ``A`` and a record: append it to the segment, then fdatasync.
Each is answered on standard output with 8 bytes: 0 when done, else the failure's errno. A failed
append is cut off its segment, and the sink starts a new segment after any failure, so no part
of an unacknowledged record ever has another record after it. At the end of its input (the sink
closed, or its process died) the writer exits. It ignores SIGINT and SIGTERM: a stopping run
still has batches to log, and closes the pipe when it is done.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from typing import BinaryIO

OPEN, APPEND = b"O", b"A"
HEADER = 9
"""A request's kind and payload length."""
PIECE = 1 << 20
"""A record is read and written in pieces of at most this many bytes, never held whole."""


def request(kind: bytes, length: int) -> bytes:
    """A request's header; its payload follows."""
    return kind + length.to_bytes(8, "little")


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """Answer requests until the end of ``requests``."""
    segment = Segment()
    try:
        while len(header := requests.read(HEADER)) == HEADER:
            kind, length = header[:1], int.from_bytes(header[1:], "little")
            try:
                if kind == OPEN:
                    segment.open(os.fsdecode(_read(requests, length)))
                elif kind == APPEND:
                    segment.append(requests, length)
                else:
                    raise OSError(errno.EPROTO, f"unknown request {kind!r}")
                status = 0
            except OSError as exc:
                status = exc.errno or errno.EIO
            replies.write(status.to_bytes(8, "little"))
            replies.flush()
    except EOFError:  # the input ended inside a request
        pass
    finally:
        segment.close()


class Segment:
    """The segment being appended to."""

    def __init__(self) -> None:
        self._fd = -1
        self._size = 0

    def open(self, path: str) -> None:
        self.close()
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644)
        self._size = 0
        fsync_directory(os.path.dirname(path) or ".")  # the new file's name is durable too

    def append(self, requests: BinaryIO, length: int) -> None:
        """Write the next ``length`` bytes of ``requests`` and sync them; on a failure, read the
        rest of the record all the same (the next request follows it) and cut the segment back."""
        left = length
        try:
            if self._fd < 0:
                raise OSError(errno.EBADF, "no segment is open")
            while left:
                piece = _read(requests, min(left, PIECE))
                left -= len(piece)
                _write_all(self._fd, piece)
            os.fdatasync(self._fd)
        except OSError:
            while left:
                left -= len(_read(requests, min(left, PIECE)))
            self._cut_back()
            raise
        self._size += length

    def _cut_back(self) -> None:
        """Truncate the segment to its synced records; close it if even that fails."""
        if self._fd >= 0:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _read(requests: BinaryIO, length: int) -> bytes:
    data = requests.read(length)
    if len(data) < length:
        raise EOFError
    return data


def fsync_directory(path: str) -> None:
    """Make the names in a directory durable (a file just made in it)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve(sys.stdin.buffer, sys.stdout.buffer)
