"""One pull worker's own ceiling: `pubsub_pull -> duckdb` and `pubsub_pull -> bigquery_streaming`
against a fast stand-in for the Pub/Sub and BigQuery REST APIs (bench/standin.py, its own process).

    python bench/bench_pull.py [--messages 200000] [--runs 3]

For each pipeline, `clickflow run` drains --messages simulated visits from the stand-in, which
counts acknowledgements. Printed: messages/s from the first pull to the last acknowledgement, and
the worker's CPU seconds per 1,000 messages over the same span (all its threads). The reference,
in the same run: a bare consumer (pull, decode the JSON and the base64, acknowledge; no parse, no
sink) against the same stand-in, which shows that the stand-in is not what bounds clickflow.
Each pipeline runs on clickflow's default event loop (uvloop) and on asyncio's own.
"""

from __future__ import annotations

import argparse
import base64
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import aiohttp
import anyio
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.emulators import free_port, wait_for

HERE = Path(__file__).resolve().parent
SUBSCRIPTION = "projects/bench/subscriptions/visits"
TICKS = os.sysconf("SC_CLK_TCK")


def stats(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=5) as answer:
        return orjson.loads(answer.read())  # type: ignore[no-any-return]


@contextmanager
def standin(messages: int, keys: Path | None = None, *more: str) -> Iterator[int]:
    """A stand-in's port, serving ``messages`` to pull (and ``keys`` at /certs, if given; ``more``
    of its options)."""
    port = free_port()
    command = [sys.executable, str(HERE / "standin.py"), "--port", str(port), "--messages", str(messages), *more]
    process = subprocess.Popen(command + (["--keys", str(keys)] if keys else []))
    try:
        wait_for(lambda: bool(stats(port)), 60)
        yield port
    finally:
        process.terminate()
        process.wait()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime, every thread


async def bare_consumer(port: int, total: int) -> None:
    url = f"http://127.0.0.1:{port}/v1/{SUBSCRIPTION}"
    done = 0
    async with aiohttp.ClientSession() as session, anyio.create_task_group() as tasks:

        async def loop() -> None:
            nonlocal done
            while done < total:
                async with session.post(f"{url}:pull", json={"maxMessages": 1000}) as answer:
                    received = orjson.loads(await answer.read()).get("receivedMessages", [])
                for item in received:
                    base64.b64decode(item["message"]["data"])
                if received:
                    ids = [item["ackId"] for item in received]
                    async with session.post(f"{url}:acknowledge", json={"ackIds": ids}):
                        done += len(ids)
            tasks.cancel_scope.cancel()

        for _ in range(2):
            tasks.start_soon(loop)


def measure_bare(messages: int) -> tuple[float, float]:
    with standin(messages) as port:
        started_cpu = time.process_time()
        anyio.run(bare_consumer, port, messages)
        cpu = time.process_time() - started_cpu
        counts = stats(port)
    return messages / (counts["last_ack"] - counts["first_pull"]), cpu / messages * 1000


def measure_clickflow(
    sink: str, event_loop: str, messages: int, workdir: Path, source_options: str
) -> tuple[float, float]:
    pipeline = workdir / "pull.yaml"
    database = workdir / "pull.duckdb"
    for stale in (database, database.with_suffix(".duckdb.wal")):
        stale.unlink(missing_ok=True)
    sinks = {
        "duckdb": f"{{type: duckdb, path: '{database}'}}",
        "bigquery_streaming": "{type: bigquery_streaming, project: bench, dataset: clickstream}",
    }
    source = f"{{type: pubsub_pull, subscription: {SUBSCRIPTION}{source_options}}}"
    pipeline.write_text(f"sources: [{source}]\nsinks: [{sinks[sink]}]\nruntime: {{event_loop: {event_loop}}}\n")
    with standin(messages) as port:
        host = f"127.0.0.1:{port}"
        env = {**os.environ, "PUBSUB_EMULATOR_HOST": host, "BIGQUERY_EMULATOR_HOST": host}
        worker = subprocess.Popen([sys.executable, "-m", "clickflow", "run", str(pipeline)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        try:
            wait_for(lambda: stats(port)["first_pull"] is not None, 60)
            cpu_at_start = cpu_seconds(worker.pid)
            deadline = time.monotonic() + 600
            while stats(port)["acked"] < messages:
                assert worker.poll() is None, worker.stderr.read().decode() if worker.stderr else ""
                assert time.monotonic() < deadline, "the worker did not drain the stand-in"
                time.sleep(0.02)
            cpu = cpu_seconds(worker.pid) - cpu_at_start
            counts = stats(port)
        finally:
            worker.send_signal(signal.SIGTERM)
            worker.communicate(timeout=60)
    if sink == "bigquery_streaming":
        assert counts["rows"] > messages, counts  # every visit's rows reached the stand-in
    return messages / (counts["last_ack"] - counts["first_pull"]), cpu / messages * 1000


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--messages", type=int, default=200_000)
    args.add_argument("--runs", type=int, default=3)
    args.add_argument("--source-options", default="", help="more pubsub_pull options, e.g. ', pull_concurrency: 4'")
    opts = args.parse_args()
    # each sink on clickflow's default loop (uvloop) and on asyncio's own
    pipelines = {"duckdb": ("duckdb", "auto"), "duckdb, asyncio": ("duckdb", "asyncio"),
                 "bigquery_streaming": ("bigquery_streaming", "auto"),
                 "bigquery_streaming, asyncio": ("bigquery_streaming", "asyncio")}  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in ["bare consumer", *pipelines]}
    with tempfile.TemporaryDirectory() as workdir:
        for run in range(1, opts.runs + 1):
            for name in results:
                if name in pipelines:
                    sink, event_loop = pipelines[name]
                    result = measure_clickflow(sink, event_loop, opts.messages, Path(workdir), opts.source_options)
                else:
                    result = measure_bare(opts.messages)
                results[name].append(result)
                print(f"run {run} {name:<32} {result[0]:>9,.0f} msg/s  {result[1]:.3f} CPU s per 1,000 messages")
    print(f"medians over {opts.runs} runs of {opts.messages:,} messages:")
    bare = statistics.median(rate for rate, _ in results["bare consumer"])
    for name, runs in results.items():
        rate, cpu = statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs)
        label = name if name == "bare consumer" else f"pubsub_pull -> {name}"
        print(f"  {label:<34} {rate:>9,.0f} msg/s  {cpu:.3f} CPU s per 1,000  ({rate / bare:.0%} of bare)")


if __name__ == "__main__":
    main()
