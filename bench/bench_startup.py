"""Start-up: `clickflow validate` and a short `file -> duckdb` run, next to `python -c pass`.

    python bench/bench_startup.py [--runs 10]

Each command runs in a fresh process; the best and median wall times of ``--runs`` are printed,
after one run that is not counted. Python may cache compiled modules, as an installed clickflow's
users have them (a ``PYTHONDONTWRITEBYTECODE`` in the environment is left out: with it, every run
compiles clickflow's modules again). ``python -X importtime -m clickflow validate config/local.yaml``
shows where the rest goes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from clickflow_simulator import VisitGenerator

REPO = Path(__file__).resolve().parent.parent


ENVIRONMENT = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}


def timed(command: list[str], runs: int) -> tuple[float, float]:
    subprocess.run(command, check=True, capture_output=True, cwd=REPO, env=ENVIRONMENT)
    walls = []
    for _ in range(runs):
        started = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd=REPO, env=ENVIRONMENT)
        walls.append(time.perf_counter() - started)
    return min(walls), statistics.median(walls)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--runs", type=int, default=10)
    opts = args.parse_args()
    with tempfile.TemporaryDirectory() as work:
        visits = Path(work) / "visits.jsonl"
        visits.write_bytes(b"\n".join(VisitGenerator(seed=1).messages(1000)) + b"\n")
        pipeline = Path(work) / "p.yaml"
        pipeline.write_text(
            f"sources: [{{type: file, path: '{visits}'}}]\nsinks: [{{type: duckdb, path: '{work}/x.duckdb'}}]\n"
        )
        clickflow = [sys.executable, "-m", "clickflow"]
        for name, command in (
            ("python -c pass", [sys.executable, "-c", "pass"]),
            ("clickflow validate config/local.yaml", [*clickflow, "validate", "config/local.yaml"]),
            ("clickflow run: 1,000 visits file -> duckdb", [*clickflow, "run", "--no-progress", str(pipeline)]),
        ):
            best, median = timed(command, opts.runs)
            print(f"{name:<44} best {best:.3f}s  median {median:.3f}s")


if __name__ == "__main__":
    main()
