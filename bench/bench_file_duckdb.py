"""End to end: a large visits file -> parser -> DuckDB, as `clickflow run` does it.

    python bench/bench_file_duckdb.py [--gigabytes 1.0 | --visits 60000] [--runs 1] [--keep]

Generates a JSON-lines file of simulated visits (once; reused from bench/out/),
runs `clickflow run` on it in a child process (into a new database each time),
and prints events per second and the child's peak resident memory. With
``--runs N`` it prints every run and the median, since shared machines vary.
Compiled modules are cached, as an installed clickflow has them.
Each run is followed by the reference: a bare ``orjson.loads`` loop over the same
file's lines, also a whole process, and the ratio of the two wall times.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from clickflow_simulator import VisitGenerator

OUT = Path(__file__).resolve().parent / "out"
ENVIRONMENT = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}
"""For the processes measured: Python may cache compiled modules, as an installed clickflow's users
have them (with ``PYTHONDONTWRITEBYTECODE``, every run would compile clickflow's modules again)."""


def make_input(path: Path, gigabytes: float, seed: int = 11, start: datetime | None = None) -> None:
    """At least ``gigabytes`` of simulated visits as JSON lines (kept and reused if already there)."""
    target = int(gigabytes * 1e9)
    if path.exists() and path.stat().st_size >= target:
        return
    generator = VisitGenerator(seed=seed, start=start)
    written, index = 0, 0
    with open(path, "wb") as out:
        while written < target:
            chunk = b"".join(generator.message(index + i) + b"\n" for i in range(10_000))
            out.write(chunk)
            written += len(chunk)
            index += 10_000


def write_visits(path: Path, visits: int, seed: int = 11) -> None:
    """A file of exactly ``visits`` simulated visits, one JSON line each."""
    generator = VisitGenerator(seed=seed)
    path.write_bytes(b"".join(generator.message(i) + b"\n" for i in range(visits)))


def file_pipeline(pipeline: Path, source: Path, database: Path) -> Path:
    """``pipeline``, written: ``source`` into a new DuckDB ``database`` (any old one removed)."""
    for stale in (database, database.with_suffix(".duckdb.wal")):
        stale.unlink(missing_ok=True)
    pipeline.write_text(f"sources: [{{type: file, path: '{source}'}}]\nsinks: [{{type: duckdb, path: '{database}'}}]\n")
    return pipeline


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--gigabytes", type=float, default=1.0)
    args.add_argument("--visits", type=int, help="a file of this many visits instead of --gigabytes")
    args.add_argument("--runs", type=int, default=1, help="repeat the run; prints each and the median")
    args.add_argument("--keep", action="store_true", help="keep the last run's DuckDB file")
    opts = args.parse_args()

    OUT.mkdir(exist_ok=True)
    started = time.perf_counter()
    if opts.visits:
        source = OUT / f"visits-{opts.visits}.jsonl"
        write_visits(source, opts.visits)
    else:
        source = OUT / f"visits-{opts.gigabytes:g}gb.jsonl"
        make_input(source, opts.gigabytes)
    print(f"input: {source} ({source.stat().st_size / 1e9:.2f} GB, prepared in {time.perf_counter() - started:.0f}s)")

    database = OUT / "bench.duckdb"
    rates, peaks, ratios = [], [], []
    for run in range(1, opts.runs + 1):
        pipeline = file_pipeline(OUT / "bench.yaml", source, database)
        os.sync()
        result = run_once(pipeline)
        bare = bare_decode(source)
        rates.append(result.events / result.seconds)
        peaks.append(result.peak_mb)
        ratios.append(result.seconds / bare)
        if run == 1:
            print(result.summary)
        print(f"run {run}: {result.events:,} events in {result.seconds:.2f}s = {rates[-1]:,.0f} events/s "
              f"(process start included), peak memory {result.peak_mb:,.0f} MB; bare orjson.loads loop "
              f"{bare:.2f}s: {ratios[-1]:.1f}x")  # fmt: skip
    if opts.runs > 1:
        print(f"median of {opts.runs} runs: {statistics.median(rates):,.0f} events/s "
              f"(range {min(rates):,.0f} to {max(rates):,.0f}), {statistics.median(ratios):.1f}x the bare decode; "
              f"peak memory at most {max(peaks):,.0f} MB")  # fmt: skip
    if not opts.keep:
        database.unlink(missing_ok=True)


BARE_DECODE = "import orjson, sys\nwith open(sys.argv[1], 'rb') as f:\n    for line in f:\n        orjson.loads(line)"


def bare_decode(path: Path) -> float:
    """Wall seconds of a whole process that only decodes every line of ``path`` with orjson."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", BARE_DECODE, str(path)], check=True)
    return time.perf_counter() - started


@dataclass
class Run:
    events: int
    seconds: float
    cpu_seconds: float
    """The child's user and system time, all its threads."""
    peak_mb: float
    summary: str


def run_once(pipeline: Path) -> Run:
    """One ``clickflow run`` in a child process, with its peak resident memory and CPU time."""
    started = time.perf_counter()
    with subprocess.Popen(
        [sys.executable, "-m", "clickflow", "run", str(pipeline), "--no-progress"],
        stdout=subprocess.PIPE, text=True, env=ENVIRONMENT,
    ) as child:  # fmt: skip
        assert child.stdout is not None
        output = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak, not the largest child's so far
        child.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    if child.returncode != 0:
        raise SystemExit(f"clickflow run failed:\n{output}")
    events = int(re.search(r"events\s+([\d,]+)", output).group(1).replace(",", ""))  # type: ignore[union-attr]
    return Run(events, seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, output.strip())


if __name__ == "__main__":
    main()
