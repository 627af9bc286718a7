"""What both BigQuery sinks share: where they write, and opening (tables checked or created)."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import AsyncIterator
from typing import Annotated, ClassVar, Self, TypeVar

import msgspec
from msgspec import Meta

from clickflow.api import RowBatch, Sink, SinkBatch
from clickflow.dlq import DeadLetterGroup, DeadLetterPage, DeadLetterQuery
from clickflow.options import SinkOptions
from clickflow.parser import VisitContext
from clickflow.schema import TABLE_NAMES
from clickflow_bigquery.client import BigQueryClient
from clickflow_bigquery.deadletters import BigQueryDeadLetters
from clickflow_bigquery.tables import ensure_tables

NAME = r"^[A-Za-z0-9_]+$"
PROJECT = re.compile(r"(?:[a-z][a-z0-9.-]*:)?[a-z][a-z0-9-]*")
"""A project's id (lowercase letters, digits and hyphens, from a letter), or a domain-scoped one
(``example.com:id``): anything else would change the REST paths it is put into."""
_TABLE_NAME_CHARACTERS = ("L", "M", "N", "Pc", "Pd", "Zs")
"""Unicode categories a BigQuery table's name may use (letters, marks, numbers, _, dashes, spaces)."""


def _valid_table_name(name: str) -> bool:
    """Whether BigQuery takes ``name`` for a table: 1 to 1,024 UTF-8 bytes of those categories."""
    return 0 < len(name.encode()) <= 1024 and all(
        unicodedata.category(c).startswith(_TABLE_NAME_CHARACTERS) for c in name
    )


class BigQueryOptions(SinkOptions, kw_only=True):
    project: Annotated[str, Meta(min_length=1)]
    """Project that owns the dataset (and pays for the writes)."""
    dataset: Annotated[str, Meta(pattern=NAME)]
    """Dataset of the four tables."""
    location: str | None = None
    """Dataset location when creating it, e.g. US or EU."""
    table_prefix: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_]*$")] = ""
    """Put before each table name."""
    tables: dict[str, str] = msgspec.field(default_factory=dict)
    """Other names for tables, e.g. {events: hits}."""
    create_tables: bool = True
    """Create the dataset and missing tables when opening, and add the nullable columns clickflow has
    gained since a table was made; else a missing table or column stops the sink from opening."""
    service_file: str | None = None
    """Service-account key; default: ADC."""

    def __post_init__(self) -> None:
        if not PROJECT.fullmatch(self.project):
            raise ValueError(
                f"project: {self.project!r} is not a Google Cloud project id (lowercase letters, digits and "
                "hyphens, starting with a letter; or DOMAIN:ID)"
            )
        unknown = set(self.tables) - set(TABLE_NAMES)
        if unknown:
            raise ValueError(f"tables: unknown table(s) {sorted(unknown)}; the tables are {', '.join(TABLE_NAMES)}")
        owners: dict[str, str] = {}
        for table, name in self.table_names().items():
            if not _valid_table_name(name):
                raise ValueError(
                    f"tables: {table} would be written to {name!r}, which BigQuery does not take for a table's name "
                    "(letters, digits, marks, _, dashes and spaces, at most 1,024 bytes)"
                )
            if name in owners:
                raise ValueError(f"tables: {owners[name]} and {table} would both be written to {name!r}")
            owners[name] = table

    def existing_only(self) -> Self:
        return msgspec.structs.replace(self, create_tables=False)

    def table_names(self) -> dict[str, str]:
        return {name: self.tables.get(name, self.table_prefix + name) for name in TABLE_NAMES}


OptionsT = TypeVar("OptionsT", bound=BigQueryOptions)
BatchT = TypeVar("BatchT", bound=SinkBatch)


class BigQuerySink(Sink[OptionsT, BatchT]):
    """Opens a client and makes sure the tables are there and match."""

    beam: ClassVar[str | None] = "clickflow_bigquery.beam:WriteBigQuery"

    async def open(self) -> None:
        self.names = self.options.table_names()
        self.client = BigQueryClient(self.options.project, self.options.service_file, self.options.location)
        await self.client.open()
        await ensure_tables(self.client, self.options.dataset, self.names, create=self.options.create_tables)

    # clickflow.dlq.DeadLetterStore: `clickflow dlq list` and `replay`

    def _dead_letters(self) -> BigQueryDeadLetters:
        return BigQueryDeadLetters(self.client, self.options.dataset, self.names)

    async def dead_letter_groups(self, query: DeadLetterQuery) -> list[DeadLetterGroup]:
        return await self._dead_letters().groups(query)

    def dead_letters(self, query: DeadLetterQuery) -> AsyncIterator[DeadLetterPage]:
        return self._dead_letters().letters(query)

    async def visit_contexts(self, visit_ids: list[str]) -> dict[str, VisitContext]:
        return await self._dead_letters().visit_contexts(visit_ids)

    async def store_replayed(self, rows: RowBatch) -> None:
        """The rows not stored yet, written as the sink writes any batch (its insertIds or job ids)."""
        new = await self._dead_letters().new_rows(rows)
        if len(new):
            batch = self.new_batch()
            batch.add(new)
            try:
                await self.write(batch)
            finally:
                batch.discard()

    async def mark_replayed(self, dead_letter_ids: list[str], at_us: int) -> None:
        await self._dead_letters().mark(dead_letter_ids, at_us)

    async def close(self) -> None:
        client = getattr(self, "client", None)  # none if open failed before making it
        if client is not None:
            await client.close()
