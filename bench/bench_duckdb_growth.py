"""What a small DuckDB write costs as the database grows, next to the same write before it grew.

    python bench/bench_duckdb_growth.py [--stored 1000000 3000000] [--dead-letters 5000000]
                                        [--batch 32] [--writes 20] [--malformed-rate 0.1]

The DuckDB sink stores each visit and dead letter once by inserting only those whose key is not
in the table yet (an ANTI JOIN on ``visit_key`` or ``dead_letter_key``, the id as a number).
DuckDB keeps no index for that, so every write scans the stored keys: this prints the median time
of one push- or pull-sized write (``--batch`` visits with their events, a ``--malformed-rate``
share of them dead letters, through the sink's own spool and ``insert``) into an empty database,
then after filling ``visits`` to each ``--stored`` size; then again, and after filling
``dead_letter`` to each ``--dead-letters`` size, with distinct ids of the same shape.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import duckdb

from clickflow.api import Message
from clickflow.parser import VisitParser
from clickflow_duckdb import DuckDBSinkOptions, connect
from clickflow_duckdb.spool import JsonSpool
from clickflow_duckdb.tables import KEYS, insert, key_value
from clickflow_simulator.generator import VisitGenerator


def fill(con: duckdb.DuckDBPyConnection, table: str, size: int) -> None:
    """Grow ``table`` to ``size`` rows: copies of one stored row under new ids of the parser's
    shape (32 hex digits), keyed as the sink keys them."""
    key, id_column = KEYS[table]
    (stored,) = con.execute(f"SELECT count(*) FROM {table}").fetchone() or (0,)
    con.execute(
        f"INSERT INTO {table} SELECT r.* REPLACE (id AS {id_column}, {key_value(table, 'id')} AS {key}) "
        f"FROM (SELECT * FROM {table} LIMIT 1) r CROSS JOIN "
        f"(SELECT md5('fill:' || i::VARCHAR) AS id FROM range({stored}, {size}) n(i))"
    )


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--stored", type=int, nargs="+", default=[1_000_000, 3_000_000])
    args.add_argument("--batch", type=int, default=32, help="visits per write")
    args.add_argument("--dead-letters", type=int, nargs="*", default=[5_000_000])
    args.add_argument("--writes", type=int, default=20, help="writes timed at each size (median)")
    args.add_argument("--malformed-rate", type=float, default=0.1)
    opts = args.parse_args()

    timed = len(opts.stored) + len(opts.dead_letters) + 2  # and the empty database, and before the dead letters
    generator = VisitGenerator(seed=11, malformed_rate=opts.malformed_rate)
    payloads = list(generator.messages(opts.batch * opts.writes * timed))
    parser = VisitParser()
    batches = iter(
        parser.parse([Message(data, f"growth:{i + j}") for j, data in enumerate(payloads[i : i + opts.batch])], "b", 0)
        for i in range(0, len(payloads), opts.batch)
    )
    with tempfile.TemporaryDirectory() as work:
        con = connect(DuckDBSinkOptions(path=f"{work}/growth.duckdb"))

        def median_write_ms() -> float:
            times = []
            for _ in range(opts.writes):
                spool = JsonSpool(work)
                spool.add(next(batches))
                spool.close()
                start = time.perf_counter()
                insert(con, spool.paths, spool.counts())
                times.append(time.perf_counter() - start)
                spool.discard()
            return statistics.median(times) * 1000

        grown = (("visits", opts.stored, "visits"), ("dead_letter", opts.dead_letters, "dead letters"))
        for table, sizes, rows in grown:
            before = median_write_ms()  # the reference: the same write before this table grows
            print(f"{'before ' + rows:>24}: {before:6.1f} ms per write of {opts.batch} visits")
            for size in sorted(sizes):
                fill(con, table, size)
                ms = median_write_ms()
                print(f"{size:>15,} {rows}: {ms:6.1f} ms per write, {ms / before:4.1f}x the write before")
        con.close()


if __name__ == "__main__":
    main()
