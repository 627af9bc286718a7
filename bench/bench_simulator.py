"""Unthrottled simulator speed on one core: it must never be what limits a benchmark.

    python bench/bench_simulator.py [--visits 100000]

Prints visits (and events) generated per second as JSON messages, best of a few rounds.
"""

from __future__ import annotations

import argparse
import time

from clickflow_simulator import VisitGenerator


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--visits", type=int, default=100_000)
    args.add_argument("--rounds", type=int, default=5)
    opts = args.parse_args()

    best = float("inf")
    size = events = 0
    for round_ in range(opts.rounds):
        generator = VisitGenerator(seed=round_)
        started = time.process_time()
        messages = list(generator.messages(opts.visits))
        best = min(best, time.process_time() - started)
        size = sum(map(len, messages))
        events = sum(m.count(b'"event_type"') for m in messages)
    print(f"{opts.visits:,} visits ({events:,} events, {size / 1e6:.0f} MB) per round, best of {opts.rounds}:")
    print(f"  {opts.visits / best:,.0f} visits/s  {events / best:,.0f} events/s  (CPU time, one core)")


if __name__ == "__main__":
    main()
