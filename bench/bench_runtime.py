"""The runtime's own cost per batch, without HTTP, next to the parser's on the same batches.

    python bench/bench_runtime.py [--sizes 1 16] [--batches 3000] [--runs 3]

An eager source of the bench's own (registered as a plugin, as a third party's would be) emits
batches of N copies of one simulated visit, each with its own message id, and waits for each
batch to be acknowledged before it emits the next: the push endpoint's steady state, without
aiohttp. Each batch is parsed, handed to the sink, written and acknowledged by the real runtime,
into the in-memory `live` sink and into DuckDB with its log (`commit_every: 1s`, each batch
fsynced by the log's writer). Prints the event loop thread's CPU per batch and per message
(the medians of ``--runs``), and, as the reference from the same run, the parser alone on the
same batches: what is left is the runtime's hand-offs (streams, tasks, bookkeeping, metrics)
and the sink's own work. A batch's fixed cost is what a push request pays divided by the
requests that share its batch.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
import types
from typing import Any

import anyio

from clickflow.api import Message, Source, SourceContext, SourceOptions
from clickflow.config import parse_pipeline
from clickflow.hookspecs import hookimpl
from clickflow.parser import VisitParser
from clickflow.plugins import load_plugins
from clickflow.runtime import Runtime, backend_options, tune_interpreter
from clickflow_simulator import VisitGenerator

VISIT = next(VisitGenerator(seed=22).messages(1))
"""The visit `bench_push.py` sends (10 events)."""


class DriverOptions(SourceOptions):
    batches: int = 3000
    size: int = 16


class _Ack:
    redelivers = False

    def __init__(self) -> None:
        self.done = anyio.Event()

    def ack(self) -> None:
        self.done.set()

    def nack(self, error: BaseException) -> None:
        raise SystemExit(f"a batch was not stored: {error}")


class Driver(Source[DriverOptions]):
    """Emits ``batches`` batches of ``size`` messages, one at a time, twice: the first round
    warms up, the second is timed (CPU of this thread, the event loop's) into ``measured``."""

    type_name = "bench_driver"
    measured: float = 0.0

    @property
    def finite(self) -> bool:  # and so eager, as a file is: each batch is written as soon as the sink is free
        return True

    async def run(self, context: SourceContext) -> None:
        sent = 0
        for timed in (False, True):
            started = time.thread_time()
            for _ in range(self.options.batches):
                messages = [Message(VISIT, f"m{sent + i}") for i in range(self.options.size)]
                sent += self.options.size
                ack = _Ack()
                await context.emit(messages, ack)
                await ack.done.wait()
            if timed:
                Driver.measured = (time.thread_time() - started) / self.options.batches


def _plugin() -> types.ModuleType:
    module = types.ModuleType("bench_runtime_plugin")

    @hookimpl
    def register_sources(register: Any) -> None:
        register(Driver)

    module.register_sources = register_sources  # type: ignore[attr-defined]
    return module


def runtime_seconds(sink: str, size: int, batches: int) -> float:
    """CPU seconds per batch of the event loop, through the runtime into ``sink``."""
    text = (
        f"sources: [{{type: bench_driver, size: {size}, batches: {batches}}}]\n"
        f"sinks: [{{{sink}}}]\nmonitor: {{port: 0}}\n"
    )
    pipeline = parse_pipeline(text, load_plugins(extra=[(_plugin(), "bench")]), "bench.yaml", {})
    anyio.run(Runtime(pipeline).run, backend_options=backend_options(pipeline.runtime))
    return Driver.measured


def parser_seconds(size: int, batches: int) -> float:
    """CPU seconds per batch of the parser alone, on the same batches."""
    parser, sent = VisitParser(), 0
    for _round in ("warm-up", "timed"):  # the second round's time is returned
        started = time.thread_time()
        for _ in range(batches):
            parser.parse([Message(VISIT, f"m{sent + i}") for i in range(size)], "bench", 0)
            sent += size
    return (time.thread_time() - started) / batches


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--sizes", type=int, nargs="+", default=[1, 16], help="messages per batch")
    args.add_argument("--batches", type=int, default=3000)
    args.add_argument("--runs", type=int, default=3)
    opts = args.parse_args()
    tune_interpreter()  # as `clickflow run` does
    with tempfile.TemporaryDirectory() as tmp:
        databases = itertools.count()  # each run into a database of its own
        sinks = {
            "live": lambda: "type: live",
            "duckdb log": lambda: f"type: duckdb, path: '{tmp}/{next(databases)}.duckdb', commit_every: 1s",
        }
        for size in opts.sizes:
            parse = statistics.median(parser_seconds(size, opts.batches) for _ in range(opts.runs))
            print(f"{size:>3} a batch, the parser alone: {parse * 1e6:7.1f} µs CPU a batch, "
                  f"{parse / size * 1e6:5.1f} a message")  # fmt: skip
            for name, sink in sinks.items():
                took = statistics.median(runtime_seconds(sink(), size, opts.batches) for _ in range(opts.runs))
                print(f"{size:>3} a batch, into {name:<10}: {took * 1e6:7.1f} µs CPU a batch, "
                      f"{took / size * 1e6:5.1f} a message; {(took - parse) * 1e6:7.1f} beside parsing")  # fmt: skip


if __name__ == "__main__":
    main()
