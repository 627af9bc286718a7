"""Gathers a DuckDB batch as newline-delimited JSON, one file per table.

Rows are encoded the moment they arrive (one C call per table per parsed
batch), so a large batch costs disk (page cache), not Python objects. DuckDB
later reads the files in its own threads, without the GIL.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Collection
from typing import BinaryIO

import msgspec

from clickflow.api import RowBatch
from clickflow.schema import TABLE_NAMES

encode_lines = msgspec.json.Encoder().encode_lines
"""Rows as spool lines: each a JSON array in the table's column order, ending in a newline."""


class Spool:
    """Rows encoded as spool lines the moment they arrive, each message's rows once; where the lines
    go is the subclass's: files (``JsonSpool``) or memory (the log's ``LogBatch``)."""

    def __init__(self) -> None:
        self._counts = dict.fromkeys(TABLE_NAMES, 0)
        self.messages: set[str] = set()
        """The messages whose rows the batch holds: visit ids, and whole-message dead letters' ids."""
        self.repeated_visits = 0
        """Visits left out because their rows were held already (``held``): redelivered."""

    def add(self, rows: RowBatch) -> None:
        messages = rows.message_keys()
        held = self.held(messages)
        if held:  # redelivered: their rows are kept once
            kept = rows.without_messages(held)
            self.repeated_visits += len(rows.tables["visits"]) - len(kept.tables["visits"])
            rows = kept
            messages = [message for message in messages if message not in held]
        self.messages.update(messages)
        for name, table_rows in rows.tables.items():
            if table_rows:
                self._write(name, encode_lines(table_rows))
                self._counts[name] += len(table_rows)

    def held(self, messages: Collection[str]) -> set[str]:
        """Which of ``messages`` have their rows where this batch goes already: in the batch itself."""
        return self.messages.intersection(messages)

    def _write(self, table: str, lines: bytes) -> None:
        raise NotImplementedError

    def __len__(self) -> int:
        return sum(self._counts.values())

    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    def close(self) -> None:
        """Make the rows ready to be read."""

    def discard(self) -> None:
        """Release the rows."""


class JsonSpool(Spool):
    """One batch for the DuckDB sink, in a file per table; ``close`` before reading, ``discard`` after."""

    def __init__(self, directory: str) -> None:
        super().__init__()
        self.files = SpoolFiles(directory)
        self.paths = self.files.paths

    def _write(self, table: str, lines: bytes) -> None:
        self.files.write(table, lines)

    def close(self) -> None:
        self.files.close()

    def discard(self) -> None:
        self.files.discard()


class SpoolFiles:
    """Spool lines in a file per table, in a directory of its own (made in ``directory``); ``close``
    before reading, ``discard`` after."""

    def __init__(self, directory: str | None, prefix: str = "batch-", buffering: int = -1) -> None:
        self.directory = tempfile.mkdtemp(prefix=prefix, dir=directory)
        self.paths = {name: os.path.join(self.directory, f"{name}.ndjson") for name in TABLE_NAMES}
        self.closed = False
        self._buffering = buffering
        self._files: dict[str, BinaryIO] = {}
        self._broken: OSError | None = None

    def written(self) -> Collection[str]:
        """The tables that have a file."""
        return self._files.keys()

    def write(self, table: str, lines: bytes) -> None:
        try:
            spool = self._files.get(table)
            if spool is None:
                spool = self._files[table] = open(self.paths[table], "wb", buffering=self._buffering)  # noqa: SIM115
            spool.write(lines)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot spool rows to {self.paths[table]}: {exc.strerror}") from exc

    def close(self) -> None:
        """Flush the files; a failure (a full disk) spoils them for good, never half-read."""
        self.closed = True
        if self._broken is None:
            for name, spool in self._files.items():
                try:
                    spool.close()
                except OSError as exc:
                    self._broken = OSError(exc.errno, f"cannot spool rows to {self.paths[name]}: {exc.strerror}")
                    break
        if self._broken is not None:
            raise self._broken

    def discard(self) -> None:
        """Remove the files; after a failed write (a full disk, say) as well, so errors are ignored."""
        for spool in self._files.values():
            with contextlib.suppress(OSError):
                spool.close()
        shutil.rmtree(self.directory, ignore_errors=True)
