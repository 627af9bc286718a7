"""Parser throughput on simulator data, next to a plain JSON-decode loop over the same bytes.

    python bench/bench_parser.py [--visits 50000] [--rounds 5]

Prints events per second for: orjson.loads alone (the floor any Python parser
pays), and clickflow's full parse (validation, ids, rows). Rounds are interleaved
and timed in CPU seconds of this single-threaded process; the best round of each
is reported, which damps noise from shared machines.
"""

from __future__ import annotations

import argparse
import time

import orjson

from clickflow.api import Message
from clickflow.parser import VisitParser
from clickflow.runtime import tune_interpreter
from clickflow_simulator.generator import VisitGenerator


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--visits", type=int, default=30_000)
    args.add_argument("--rounds", type=int, default=15)
    args.add_argument("--batch", type=int, default=1000)
    opts = args.parse_args()

    generator = VisitGenerator(seed=7)
    messages = [Message(data, f"bench:{i}") for i, data in enumerate(generator.messages(opts.visits))]
    batches = [messages[i : i + opts.batch] for i in range(0, len(messages), opts.batch)]
    payloads = [m.data for m in messages]
    parser = VisitParser()
    counts = parser.parse(messages, "bench", 0).counts()
    tune_interpreter()  # as `clickflow run` does
    events = counts["events"]

    def orjson_only() -> None:
        for data in payloads:
            orjson.loads(data)

    def clickflow_parse() -> None:
        for batch in batches:
            parser.parse(batch, "bench", 0)

    best = {"orjson.loads only": float("inf"), "clickflow parser": float("inf")}
    for _ in range(opts.rounds):
        for name, fn in (("orjson.loads only", orjson_only), ("clickflow parser", clickflow_parse)):
            t0 = time.process_time()
            fn()
            best[name] = min(best[name], time.process_time() - t0)

    megabytes = sum(map(len, payloads)) / 1e6
    print(f"input: {opts.visits:,} visits, {events:,} events, {megabytes:.1f} MB ({counts})")
    for name, seconds in best.items():
        print(f"{name:>20}: {events / seconds:>12,.0f} events/s  {opts.visits / seconds:>10,.0f} visits/s")


if __name__ == "__main__":
    main()
