"""What parsing a file in more processes could buy `file -> duckdb`: a run's parts, each alone, in one run.

    python bench/bench_parse_processes.py [--visits 40000] [--processes 1 2] [--runs 3]

The reference is `clickflow run` on a file of simulated visits into DuckDB (a whole process),
and on a one-visit file (its start-up). Then the file's lines are parsed by the real parser and
their rows encoded as the DuckDB sink's spool files, in batches of 1,000 lines as the file source
reads them, by one process and by several (forked after the imports, each taking every Nth
batch); and the spool files are inserted alone, by the sink's own `insert`. A design that parses
in child processes and inserts in the parent, overlapping the two perfectly, could take no less
than start-up plus the longer of the two; this prints that bound next to the real run. A
measurement for the design, not a feature: nothing here is in the package.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clickflow.api import Message
from clickflow.parser import VisitParser
from clickflow.runtime import tune_interpreter
from clickflow.schema import TABLE_NAMES
from clickflow_duckdb import DuckDBSinkOptions, connect, insert
from clickflow_duckdb.spool import encode_lines
from clickflow_simulator import VisitGenerator

OUT = Path(__file__).resolve().parent / "out"
BATCH = 1000


def clickflow_run(source: Path, database: Path) -> float:
    """Wall seconds of one ``clickflow run`` of ``source`` into a new ``database``."""
    for stale in (database, database.with_suffix(".duckdb.wal")):
        stale.unlink(missing_ok=True)
    pipeline = database.with_suffix(".yaml")
    pipeline.write_text(f"sources: [{{type: file, path: '{source}'}}]\nsinks: [{{type: duckdb, path: '{database}'}}]\n")
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "clickflow", "run", str(pipeline), "--no-progress"],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return time.perf_counter() - started


def parse_part(source: str, work: str, part: int, parts: int) -> dict[str, int]:
    """Parse every ``parts``-th batch of lines, from the ``part``-th, into spool files of its own."""
    parser = VisitParser()
    counts = dict.fromkeys(TABLE_NAMES, 0)
    files = {name: open(os.path.join(work, f"{name}.{part}.ndjson"), "wb") for name in TABLE_NAMES}  # noqa: SIM115

    def spool(batch: list[Message]) -> None:
        for name, rows in parser.parse(batch, "file", 0).tables.items():
            files[name].write(encode_lines(rows))
            counts[name] += len(rows)

    try:
        with open(source, "rb") as lines:
            batch: list[Message] = []
            for number, line in enumerate(lines, 1):
                if (number - 1) // BATCH % parts == part:
                    batch.append(Message(line.strip(), f"{source}:{number}"))
                if batch and number % BATCH == 0:
                    spool(batch)
                    batch = []
            if batch:
                spool(batch)
    finally:
        for file in files.values():
            file.close()
    return counts


def parse(source: Path, work: Path, processes: int) -> tuple[float, dict[str, int]]:
    """Wall seconds to parse ``source`` into spool files in ``processes`` processes (forked)."""
    started = time.perf_counter()
    if processes == 1:
        results = [parse_part(str(source), str(work), 0, 1)]
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            results = pool.starmap(parse_part, [(str(source), str(work), i, processes) for i in range(processes)])
    seconds = time.perf_counter() - started
    return seconds, {name: sum(result[name] for result in results) for name in TABLE_NAMES}


def insert_alone(work: Path, counts: dict[str, int]) -> float:
    """Wall seconds for the sink's ``insert`` of the spool files into a new database."""
    database = work / "insert.duckdb"
    paths = {name: sorted(str(path) for path in work.glob(f"{name}.*.ndjson")) for name in TABLE_NAMES}
    with connect(DuckDBSinkOptions(path=str(database))) as con:
        started = time.perf_counter()
        insert(con, paths, counts)
        (stored,) = con.execute("SELECT count(*) FROM events").fetchone() or (0,)
    seconds = time.perf_counter() - started
    assert stored == counts["events"], (stored, counts)
    database.unlink()
    return seconds


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--visits", type=int, default=40_000)
    args.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    args.add_argument("--runs", type=int, default=3)
    opts = args.parse_args()
    tune_interpreter()
    OUT.mkdir(exist_ok=True)
    source, one = OUT / f"visits-{opts.visits}.jsonl", OUT / "visits-1.jsonl"
    generator = VisitGenerator(seed=11)
    source.write_bytes(b"".join(generator.message(i) + b"\n" for i in range(opts.visits)))
    one.write_bytes(generator.message(0) + b"\n")
    print(f"input: {source} ({source.stat().st_size / 1e6:.1f} MB), {os.cpu_count()} cores")
    figures: dict[str, list[float]] = {}
    for run in range(1, opts.runs + 1):
        with tempfile.TemporaryDirectory(dir=OUT) as tmp:
            work = Path(tmp)
            figures.setdefault("clickflow run", []).append(clickflow_run(source, work / "run.duckdb"))
            figures.setdefault("start-up (a one-visit file)", []).append(clickflow_run(one, work / "one.duckdb"))
            for processes in opts.processes:
                for stale in work.glob("*.ndjson"):
                    stale.unlink()
                seconds, counts = parse(source, work, processes)
                figures.setdefault(f"parse and encode, {processes} processes", []).append(seconds)
                figures.setdefault(f"insert alone, after {processes} processes", []).append(insert_alone(work, counts))
        print(f"run {run}: " + ", ".join(f"{name} {seconds[-1]:.2f}s" for name, seconds in figures.items()))
    median = {name: statistics.median(seconds) for name, seconds in figures.items()}
    print(f"medians of {opts.runs} runs:")
    for name, seconds in median.items():
        print(f"  {name:<40} {seconds:.2f}s")
    start_up, real = median["start-up (a one-visit file)"], median["clickflow run"]
    for processes in opts.processes:
        parsing = median[f"parse and encode, {processes} processes"]
        inserting = median[f"insert alone, after {processes} processes"]
        overlapped = start_up + max(parsing, inserting)
        print(f"{processes} processes: at best {overlapped:.2f}s, parsing and inserting overlapped "
              f"({real / overlapped:.1f}x faster than the real run); "
              f"{start_up + parsing + inserting:.2f}s one after the other")  # fmt: skip


if __name__ == "__main__":
    main()
