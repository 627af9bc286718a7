"""A DuckDB sink whose first writes fail (the 'injected' failure of the Pub/Sub tests), or which is slow."""

from __future__ import annotations

import anyio

from clickflow.api import AnySink
from clickflow.hookspecs import Register, hookimpl
from clickflow.options import Duration
from clickflow_duckdb import DuckDBSink, DuckDBSinkOptions
from clickflow_duckdb.spool import JsonSpool


class FlakyOptions(DuckDBSinkOptions):
    fail_first: int = 0
    hold: Duration = Duration()
    """Each write waits this long first: a slow sink, for which pushed requests wait."""


class FlakyDuckDBSink(DuckDBSink):
    type_name = "flaky_duckdb"
    Options = FlakyOptions  # a concrete sink's subclass narrows its options explicitly
    options: FlakyOptions
    attempts = 0

    async def write(self, batch: JsonSpool) -> None:
        await anyio.sleep(self.options.hold.total_seconds())
        self.attempts += 1
        if self.attempts <= self.options.fail_first:
            raise ConnectionError(f"injected failure {self.attempts}")
        await super().write(batch)


@hookimpl
def register_sinks(register: Register[AnySink]) -> None:
    register(FlakyDuckDBSink)
