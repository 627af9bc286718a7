"""What a small DuckDB write costs as the database grows, next to the same write into an empty one.

    python bench/bench_duckdb_growth.py [--stored 1000000 3000000] [--batch 32] [--writes 20]

The DuckDB sink stores each visit once by inserting only the visits whose ``visit_id`` is not in
the table yet (an ANTI JOIN on ``visit_key``, the id as a number). DuckDB keeps no index for that,
so every write scans the stored keys: this prints the median time of one push- or pull-sized
write (``--batch`` visits with their events, through the sink's own spool and ``insert``) into an
empty database, then after filling ``visits`` to each ``--stored`` size with distinct ids of the
same shape.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from clickflow.api import Message
from clickflow.parser import VisitParser
from clickflow_duckdb import DuckDBSinkOptions, connect
from clickflow_duckdb.spool import JsonSpool
from clickflow_duckdb.tables import VISIT_KEY, insert, visit_key
from clickflow_simulator.generator import VisitGenerator


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--stored", type=int, nargs="+", default=[1_000_000, 3_000_000])
    args.add_argument("--batch", type=int, default=32, help="visits per write")
    args.add_argument("--writes", type=int, default=20, help="writes timed at each size (median)")
    opts = args.parse_args()

    payloads = list(VisitGenerator(seed=11).messages(opts.batch * opts.writes * (len(opts.stored) + 1)))
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

        empty = median_write_ms()
        print(f"{'empty database':>24}: {empty:6.1f} ms per write of {opts.batch} visits")
        for size in sorted(opts.stored):
            (stored,) = con.execute("SELECT count(*) FROM visits").fetchone() or (0,)
            # Distinct 32-hex-digit ids, like the parser's: copies of one stored visit under new ids.
            con.execute(
                f"INSERT INTO visits SELECT v.* REPLACE (id AS visit_id, {visit_key('id')} AS {VISIT_KEY}) "
                f"FROM (SELECT * FROM visits LIMIT 1) v CROSS JOIN "
                f"(SELECT md5('fill:' || i::VARCHAR) AS id FROM range({stored}, {size}) r(i))"
            )
            ms = median_write_ms()
            print(f"{size:>15,} visits: {ms:6.1f} ms per write, {ms / empty:4.1f}x the empty database's")
        con.close()


if __name__ == "__main__":
    main()
