"""The async runtime against Apache Beam's local runner, on the same file, in the same run.

    python bench/bench_beam.py [--megabytes 50] [--runs 3]

Generates a JSON-lines file of simulated visits (once; reused from bench/out/)
and runs `clickflow run config/files.yaml` on it three ways, each in a child
process writing its own DuckDB file: the async runtime, Beam in one process,
and Beam with two worker processes. Prints events per second (wall time of the
whole command, start-up included), the peak memory of the `clickflow`
process (Beam's worker processes not included) and the wall time of the same
command on a one-visit file (start-up, mostly), for each of ``--runs`` rounds,
then the medians and the async runtime's rate as a multiple of each Beam run's;
checks that all three wrote the same number of rows to every table. Compiled modules are cached,
as an installed clickflow (and Beam) has them.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
from bench_file_duckdb import ENVIRONMENT, make_input  # this folder is on sys.path when run as a script

from clickflow.schema import TABLE_NAMES

OUT = Path(__file__).resolve().parent / "out"
REPO = OUT.parent.parent
RUNS = {
    "async runtime (--runner local)": ["--runner", "local", "--no-progress"],
    "Beam, one process (--runner beam)": ["--runner", "beam"],
    "Beam, two processes (--runner beam --direct_num_workers=2)": [
        "--runner", "beam", "--direct_num_workers=2", "--direct_running_mode=multi_processing",
    ],
}  # fmt: skip


def counts(database: Path) -> dict[str, int]:
    with duckdb.connect(str(database), read_only=True) as con:
        return {table: con.execute(f"SELECT count(*) FROM {table}").fetchone()[0] for table in TABLE_NAMES}  # type: ignore[index]


def run(flags: list[str], source: Path, database: Path) -> tuple[float, int, float]:
    """One ``clickflow run`` in a child process: wall seconds, events, and the child's own peak MB."""
    database.unlink(missing_ok=True)
    env = {**ENVIRONMENT, "CLICKFLOW_INPUT": str(source), "CLICKFLOW_DUCKDB": str(database)}
    command = [sys.executable, "-m", "clickflow", "run", "config/files.yaml", *flags]
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(command, stdout=out, stderr=err, env=env, cwd=REPO)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak memory, not its workers'
        seconds = time.perf_counter() - started
        out.seek(0), err.seek(0)
        stdout, stderr = out.read(), err.read()
    if os.waitstatus_to_exitcode(status):
        sys.exit(f"clickflow run {' '.join(flags)} failed:\n{stderr}")
    events = int(re.search(r"events\s+([\d,]+)", stdout).group(1).replace(",", ""))  # type: ignore[union-attr]
    return seconds, events, usage.ru_maxrss / 1024


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--megabytes", type=float, default=50.0)
    args.add_argument("--runs", type=int, default=3, help="rounds of the three runs (medians are compared)")
    opts = args.parse_args()

    OUT.mkdir(exist_ok=True)
    source = OUT / f"visits-{opts.megabytes:g}mb.jsonl"
    make_input(source, opts.megabytes / 1000)
    one_visit = OUT / "one-visit.jsonl"
    one_visit.write_bytes(source.open("rb").readline())
    print(f"input: {source} ({source.stat().st_size / 1e6:.1f} MB)")

    times: dict[str, list[tuple[float, float]]] = {name: [] for name in RUNS}  # (whole file, one visit)
    rates: dict[str, float] = {}
    rows: dict[tuple[str, int], dict[str, int]] = {}  # every run's, all compared
    for round_ in range(1, opts.runs + 1):
        for index, (name, flags) in enumerate(RUNS.items()):  # interleaved, so a slow minute hits all three
            database = OUT / f"beam-bench-{index}.duckdb"
            startup, _, _ = run(flags, one_visit, database)
            seconds, events, peak = run(flags, source, database)
            times[name].append((seconds, startup))
            rows[name, round_] = counts(database)
            database.unlink()
            print(f"run {round_} {name:<60} {seconds:5.2f}s ({events / seconds:>9,.0f} events/s), "
                  f"peak {peak:,.0f} MB; a one-visit file {startup:.2f}s")  # fmt: skip
    print(f"medians of {opts.runs} runs, {events:,} events:")
    for name, measured in times.items():
        seconds, startup = (statistics.median(column) for column in zip(*measured, strict=True))
        rates[name] = events / seconds
        print(f"  {name:<60} {seconds:5.2f}s = {rates[name]:>9,.0f} events/s; a one-visit file {startup:.2f}s, "
              f"so {events / (seconds - startup):,.0f} events/s after start-up")  # fmt: skip

    (ours, *beams) = rates
    for beam in beams:
        print(f"{ours.split(' (')[0]}: {rates[ours] / rates[beam]:.1f}x {beam.split(' (')[0]}")
    (reference, *others) = rows.values()
    same = all(counted == reference for counted in others)
    print(f"rows per table, every run: {reference}" if same else f"rows differ: {rows}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
