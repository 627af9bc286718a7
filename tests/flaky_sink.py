"""A DuckDB sink whose first writes fail: the 'injected' failure of the Pub/Sub tests."""

from __future__ import annotations

from clickflow.api import AnySink
from clickflow.hookspecs import Register, hookimpl
from clickflow_duckdb import DuckDBSink, DuckDBSinkOptions
from clickflow_duckdb.spool import JsonSpool


class FlakyOptions(DuckDBSinkOptions):
    fail_first: int = 0


class FlakyDuckDBSink(DuckDBSink):
    type_name = "flaky_duckdb"
    Options = FlakyOptions  # a concrete sink's subclass narrows its options explicitly
    options: FlakyOptions
    attempts = 0

    async def write(self, batch: JsonSpool) -> None:
        self.attempts += 1
        if self.attempts <= self.options.fail_first:
            raise ConnectionError(f"injected failure {self.attempts}")
        await super().write(batch)


@hookimpl
def register_sinks(register: Register[AnySink]) -> None:
    register(FlakyDuckDBSink)
