"""A pull worker's peak memory when its pull responses carry several of the costliest messages.

    python bench/bench_pull_memory.py [--messages 100] [--per-pull 1 10 25]

Whoever can publish to the topic chooses what is in a message, and Pub/Sub how many messages a
pull response holds. Each run drains ``--messages`` copies of ``bench_push_memory.py``'s costliest
visit (50,000 page views whose repeated ids are 256 characters: 4.4 MB, 50 MB of rows as JSON)
from the fast local stand-in (``standin.py --payload``), at most ``--per-pull`` of them in a pull
response, through ``pubsub_pull`` with its defaults into ``bigquery_streaming`` (the same
stand-in) and into DuckDB. Printed: the worker's peak resident memory (``VmHWM``) and the
messages acknowledged, against the 1 GiB limit of ``deploy/k8s/pull.yaml``.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_pull import SUBSCRIPTION, standin, stats  # this folder is on sys.path when run as a script
from bench_push_memory import envelope, peak_kb

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.emulators import wait_for


def run(sink: str, messages: int, per_pull: int, payload: Path, work: Path) -> str:
    database = work / f"pull-{per_pull}.duckdb"
    sinks = {"duckdb": f"{{type: duckdb, path: '{database}'}}",
             "bigquery_streaming": "{type: bigquery_streaming, project: bench, dataset: clickstream}"}  # fmt: skip
    pipeline = work / "pull.yaml"
    pipeline.write_text(f"sources: [{{type: pubsub_pull, subscription: {SUBSCRIPTION}}}]\nsinks: [{sinks[sink]}]\n")
    with standin(messages, None, "--payload", str(payload), "--per-pull", str(per_pull)) as port:
        host = f"127.0.0.1:{port}"
        env = {**os.environ, "PUBSUB_EMULATOR_HOST": host, "BIGQUERY_EMULATOR_HOST": host}
        command = [sys.executable, "-m", "clickflow", "run", str(pipeline), "--no-progress"]
        log = work / "worker.log"
        with open(log, "wb") as output:
            worker = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=output)
        try:
            wait_for(lambda: stats(port)["acked"] >= messages or worker.poll() is not None, 600)
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited ({worker.returncode}): {log.read_text()[-2000:]}")
            peak, acked = peak_kb(worker.pid), int(stats(port)["acked"])
        finally:
            worker.terminate()
            worker.wait(timeout=60)
    return f"{sink:<18} {per_pull:>3} a pull: peak {peak / 1024:,.0f} MB, {acked} of {messages} acknowledged"


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--messages", type=int, default=100)
    args.add_argument("--per-pull", type=int, nargs="+", default=[1, 10, 25])
    opts = args.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        payload = work / "visit.json"
        payload.write_bytes(base64.b64decode(json.loads(envelope(0))["message"]["data"]))
        print(f"{opts.messages} messages of {payload.stat().st_size / 1e6:.1f} MB each, pulled with the defaults")
        for per_pull in opts.per_pull:
            for sink in ("bigquery_streaming", "duckdb"):
                print(run(sink, opts.messages, per_pull, payload, work), flush=True)


if __name__ == "__main__":
    main()
