"""The cost of the live view: `file -> duckdb` with and without a `live` sink, in the same run.

    python bench/bench_live.py [--gigabytes 0.5] [--runs 5]

The input is simulated visits whose events lie in the past (so every event is windowed, as in a
backfill), and the live sink keeps a day of one-minute windows with an hour of allowed lateness.
Runs alternate between the two pipelines. Printed: the median events/s of each and their ratio,
and the median CPU seconds per million events (all the process's threads), which a shared
machine's noise disturbs less than wall time, and which is what a user pays per core.
"""

from __future__ import annotations

import argparse
import os
import statistics
from datetime import UTC, datetime

from bench_file_duckdb import OUT, make_input, run_once


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--gigabytes", type=float, default=0.5)
    args.add_argument("--runs", type=int, default=5)
    opts = args.parse_args()
    OUT.mkdir(exist_ok=True)
    source = OUT / f"visits-past-{opts.gigabytes:g}gb.jsonl"
    make_input(source, opts.gigabytes, seed=12, start=datetime(2024, 7, 1, tzinfo=UTC))
    database = OUT / "bench-live.duckdb"
    sinks = {
        "duckdb": f"{{type: duckdb, path: '{database}'}}",
        "duckdb + live": f"{{type: duckdb, path: '{database}'}}, {{type: live, allowed_lateness: 1h,"
        " keep_minutes: 1440, alerts: [{name: spike, kind: spike}, {name: ceiling, kind: threshold, above: 100000}]}",
    }
    rates: dict[str, list[float]] = {name: [] for name in sinks}
    cpu: dict[str, list[float]] = {name: [] for name in sinks}
    for run in range(1, opts.runs + 1):
        for name, sink in sinks.items():
            pipeline = OUT / "bench-live.yaml"
            pipeline.write_text(f"sources: [{{type: file, path: '{source}'}}]\nsinks: [{sink}]\nmonitor: {{port: 0}}\n")
            for stale in (database, database.with_suffix(".duckdb.wal")):
                stale.unlink(missing_ok=True)
            os.sync()
            result = run_once(pipeline)
            rates[name].append(result.events / result.seconds)
            cpu[name].append(result.cpu_seconds / result.events * 1e6)
            print(f"run {run} {name:<14} {result.events:,} events in {result.seconds:.1f}s = "
                  f"{rates[name][-1]:,.0f} events/s, {cpu[name][-1]:.2f} CPU s per million events, "
                  f"peak {result.peak_mb:,.0f} MB")  # fmt: skip
    without, with_live = (statistics.median(rates[name]) for name in sinks)
    cpu_without, cpu_with = (statistics.median(cpu[name]) for name in sinks)
    print(f"median without live: {without:,.0f} events/s, {cpu_without:.2f} CPU s per million events")
    print(f"median with live:    {with_live:,.0f} events/s, {cpu_with:.2f} CPU s per million events")
    print(f"cost of the live view: {100 * (1 - with_live / without):.1f}% fewer events/s, "
          f"{100 * (cpu_with / cpu_without - 1):.1f}% more CPU per event")  # fmt: skip
    # each run with live next to the run just before it: the machine's drift cancels better
    paired = statistics.median(b / a for a, b in zip(*rates.values(), strict=True))
    print(f"median of the paired runs' ratios: {100 * (1 - paired):.1f}% fewer events/s")
    database.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
