"""Start-up: `clickflow validate`, a short `file -> duckdb` run and a push endpoint's cold start,
next to `python -c pass`.

    python bench/bench_startup.py [--runs 10]

Each command runs in a fresh process; the best and median wall times of ``--runs`` are printed,
after one run that is not counted. The push endpoint's figure is the time from starting
`clickflow run` to the first push request answered 204 (its message stored in DuckDB): what a
Cloud Run cold start adds. Then ``python -X importtime -m clickflow validate config/local.yaml``,
summed by top-level package (each module's own time, so nothing is counted twice; importtime's
own overhead inflates every figure alike). Python may cache compiled modules, as an installed
clickflow's users have them (a ``PYTHONDONTWRITEBYTECODE`` in the environment is left out: with it,
every run compiles clickflow's modules again).
"""

from __future__ import annotations

import argparse
import base64
import json
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from functools import partial
from pathlib import Path

from bench_file_duckdb import ENVIRONMENT  # this folder is on sys.path when run as a script

from clickflow_simulator import VisitGenerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.emulators import REPO, free_port


def timed(measure: Callable[[int], float], runs: int) -> str:
    """Best and median of ``measure(1)`` .. ``measure(runs)``, after ``measure(0)``, which is not counted."""
    seconds = [measure(attempt) for attempt in range(runs + 1)][1:]
    return f"best {min(seconds):.3f}s  median {statistics.median(seconds):.3f}s"


def wall(command: list[str], _attempt: int) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, cwd=REPO, env=ENVIRONMENT)
    return time.perf_counter() - started


def first_push_stored(command: list[str], port: int, body: bytes) -> float:
    """Seconds from starting the push pipeline to its first request answered 204."""
    started = time.perf_counter()
    server = subprocess.Popen(command, cwd=REPO, env=ENVIRONMENT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    request = urllib.request.Request(f"http://127.0.0.1:{port}/pubsub/push", body, {"Content-Type": "application/json"})
    try:
        while True:
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    if response.status == 204:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError):
                if server.poll() is not None:
                    _, errors = server.communicate()
                    raise SystemExit(f"clickflow run failed: {errors.decode()}") from None
                time.sleep(0.002)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)


def import_times(command: list[str]) -> Counter[str]:
    """Microseconds of each top-level package's own import time, from ``-X importtime``."""
    result = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO, env=ENVIRONMENT)
    own: Counter[str] = Counter()
    for found in re.finditer(r"import time:\s+(\d+) \|\s+\d+ \|\s*([\w.]+)", result.stderr):
        own[found.group(2).split(".")[0]] += int(found.group(1))
    return own


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
            print(f"{name:<44} {timed(partial(wall, command), opts.runs)}")

        port = free_port()
        push = Path(work) / "push.yaml"
        push.write_text(
            "sources: [{type: pubsub_push, auth: none}]\n"
            f"sinks: [{{type: duckdb, path: '{work}/push.duckdb'}}]\n"
            f"monitor: {{port: {port}}}\n"
        )

        def cold_start(attempt: int) -> float:
            data = base64.b64encode(next(VisitGenerator(seed=attempt).messages(1))).decode()
            body = json.dumps({"message": {"data": data, "messageId": f"cold-{attempt}"}}).encode()
            return first_push_stored([*clickflow, "run", "--no-progress", str(push)], port, body)

        print(f"{'push: start to first request stored':<44} {timed(cold_start, opts.runs)}")

        own = import_times([sys.executable, "-X", "importtime", "-m", "clickflow", "validate", "config/local.yaml"])
        total = sum(own.values())
        print(f"\nimport time of `clickflow validate config/local.yaml` by package: {total / 1e6:.3f}s in all")
        for package, micros in own.most_common(12):
            print(f"  {package:<28} {micros / 1e3:7.1f} ms  {micros / total:4.0%}")


if __name__ == "__main__":
    main()
