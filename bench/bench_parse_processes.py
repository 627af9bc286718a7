"""What parsing a file in more processes could buy `file -> duckdb`: a run's parts, each alone, in one run.

    python bench/bench_parse_processes.py [--visits 40000] [--processes 1 2] [--runs 3]

The reference is `clickflow run` on a file of simulated visits into DuckDB (a whole process),
and on a one-visit file (its start-up). Then the file is read by the file source's reader, parsed
by the real parser and spooled as the DuckDB sink spools a batch (``JsonSpool``), in batches of
1,000 lines as the file source hands them over, by one process and by several (forked after the
imports, each taking every Nth batch); and the spooled rows are inserted alone, by the sink's own
`insert`. A design that parses in child processes and inserts in the parent, overlapping the two
perfectly, could take no less than start-up plus the longer of the two; this prints that bound
next to the real run. A measurement for the design, not a feature: nothing here is in the package.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import tempfile
import time
from pathlib import Path

from bench_file_duckdb import file_pipeline, run_once, write_visits  # this folder is on sys.path when run as a script

from clickflow.api import Message
from clickflow.parser import VisitParser
from clickflow.runtime import tune_interpreter
from clickflow.schema import TABLE_NAMES
from clickflow_duckdb import DuckDBSinkOptions, connect
from clickflow_duckdb.spool import JsonSpool
from clickflow_duckdb.tables import insert
from clickflow_file.reader import iter_messages

OUT = Path(__file__).resolve().parent / "out"
BATCH = 1000


def parse_part(source: str, work: str, part: int, parts: int) -> tuple[dict[str, str], dict[str, int]]:
    """Parse every ``parts``-th batch of lines, from the ``part``-th, into one spool of its own:
    its files and rows per table."""
    parser = VisitParser()
    spool = JsonSpool(work)
    with open(source, "rb") as stream:
        batch: list[Message] = []
        for index, (message_id, data) in enumerate(iter_messages(stream, source)):
            if index // BATCH % parts == part:
                batch.append(Message(data, message_id))
            if batch and (index + 1) % BATCH == 0:
                spool.add(parser.parse(batch, "file", 0))
                batch = []
        if batch:
            spool.add(parser.parse(batch, "file", 0))
    spool.close()
    return spool.paths, spool.counts()


def parse(source: Path, work: Path, processes: int) -> tuple[float, dict[str, list[str]], dict[str, int]]:
    """Wall seconds to parse ``source`` into spool files in ``processes`` processes (forked), the
    files and the rows per table."""
    started = time.perf_counter()
    if processes == 1:
        results = [parse_part(str(source), str(work), 0, 1)]
    else:
        with multiprocessing.get_context("fork").Pool(processes) as pool:
            results = pool.starmap(parse_part, [(str(source), str(work), i, processes) for i in range(processes)])
    seconds = time.perf_counter() - started
    paths = {name: [files[name] for files, _ in results if os.path.exists(files[name])] for name in TABLE_NAMES}
    counts = {name: sum(rows[name] for _, rows in results) for name in TABLE_NAMES}
    return seconds, paths, counts


def insert_alone(work: Path, paths: dict[str, list[str]], counts: dict[str, int]) -> float:
    """Wall seconds for the sink's ``insert`` of the spool files into a new database."""
    database = work / "insert.duckdb"
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
    write_visits(source, opts.visits)
    write_visits(one, 1)
    print(f"input: {source} ({source.stat().st_size / 1e6:.1f} MB), {os.cpu_count()} cores")
    figures: dict[str, list[float]] = {}
    for run in range(1, opts.runs + 1):
        with tempfile.TemporaryDirectory(dir=OUT) as tmp:
            work = Path(tmp)
            for name, path in (("clickflow run", source), ("start-up (a one-visit file)", one)):
                pipeline = file_pipeline(work / "run.yaml", path, work / "run.duckdb")
                figures.setdefault(name, []).append(run_once(pipeline).seconds)
            for processes in opts.processes:
                seconds, paths, counts = parse(source, work, processes)
                figures.setdefault(f"parse and encode, {processes} processes", []).append(seconds)
                inserting = insert_alone(work, paths, counts)
                figures.setdefault(f"insert alone, after {processes} processes", []).append(inserting)
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
