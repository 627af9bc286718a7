"""End to end: a large visits file -> parser -> DuckDB, as `clickflow run` does it.

    python bench/bench_file_duckdb.py [--gigabytes 1.0] [--keep]

Generates a JSON-lines file of simulated visits (once; reused from bench/out/),
runs `clickflow run` on it in a child process, and prints events per second and
the child's peak resident memory.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from clickflow_simulator import VisitGenerator

OUT = Path(__file__).resolve().parent / "out"


def make_input(path: Path, gigabytes: float) -> None:
    target = int(gigabytes * 1e9)
    if path.exists() and path.stat().st_size >= target:
        return
    generator = VisitGenerator(seed=11)
    written, index = 0, 0
    with open(path, "wb") as out:
        while written < target:
            chunk = b"".join(generator.message(index + i) + b"\n" for i in range(10_000))
            out.write(chunk)
            written += len(chunk)
            index += 10_000


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--gigabytes", type=float, default=1.0)
    args.add_argument("--keep", action="store_true", help="keep the DuckDB file")
    opts = args.parse_args()

    OUT.mkdir(exist_ok=True)
    source = OUT / f"visits-{opts.gigabytes:g}gb.jsonl"
    started = time.perf_counter()
    make_input(source, opts.gigabytes)
    print(f"input: {source} ({source.stat().st_size / 1e9:.2f} GB, prepared in {time.perf_counter() - started:.0f}s)")

    database = OUT / "bench.duckdb"
    for stale in (database, database.with_suffix(".duckdb.wal")):
        stale.unlink(missing_ok=True)
    pipeline = OUT / "bench.yaml"
    pipeline.write_text(f"sources: [{{type: file, path: '{source}'}}]\nsinks: [{{type: duckdb, path: '{database}'}}]\n")

    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, "-m", "clickflow", "run", str(pipeline), "--no-progress"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    events = int(re.search(r"events\s+([\d,]+)", result.stdout).group(1).replace(",", ""))  # type: ignore[union-attr]
    print(result.stdout.strip())
    print(
        f"end to end: {events:,} events in {seconds:.1f}s = {events / seconds:,.0f} events/s (process start included)"
    )
    print(f"peak memory (max RSS of the clickflow process): {peak_mb:,.0f} MB")
    if not opts.keep:
        database.unlink(missing_ok=True)
    os.sync()


if __name__ == "__main__":
    main()
