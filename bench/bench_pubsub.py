"""Pub/Sub paths against Google's emulator: pull pipeline vs raw pull+ack, and push endpoint load.

    python bench/bench_pubsub.py [--messages 50000] [--push-requests 5000] [--push-concurrency 32]

0. `clickflow simulate --topic` unthrottled into the emulator: the publishing rate it reports.
1. Publishes the same visits to two subscriptions. Drains one with bare
   pull+acknowledge calls (the emulator's own ceiling), the other with a
   clickflow pipeline (pubsub_pull -> parser -> DuckDB), and prints both rates.
2. Runs `clickflow run` with a pubsub_push source in a child process and sends it
   push envelopes from this process at fixed concurrency: requests/s and latency
   percentiles (each answer waits until the rows are stored).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import anyio
import anyio.abc

from clickflow.config import parse_pipeline
from clickflow.plugins import load_plugins
from clickflow.runtime import Runtime
from clickflow_simulator import VisitGenerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.emulators import PubSubEmulator, free_port, pubsub_launcher, ready, running_pubsub_emulator, wait_for


async def raw_drain(host: str, subscription: str, total: int, concurrency: int = 2) -> float:
    done = 0
    started = time.perf_counter()
    async with aiohttp.ClientSession() as session:

        async def worker(tg: anyio.abc.TaskGroup) -> None:
            nonlocal done
            while True:
                async with session.post(f"http://{host}/v1/{subscription}:pull", json={"maxMessages": 1000}) as r:
                    received = (await r.json()).get("receivedMessages", [])
                if received:
                    ids = [m["ackId"] for m in received]
                    async with session.post(f"http://{host}/v1/{subscription}:acknowledge", json={"ackIds": ids}):
                        pass
                    done += len(ids)
                if done >= total:
                    tg.cancel_scope.cancel()  # the other worker may be in a held, empty pull

        async with anyio.create_task_group() as tg:
            for _ in range(concurrency):
                tg.start_soon(worker, tg)
    return time.perf_counter() - started


async def pipeline_drain(runtime: Runtime, total: int) -> float:
    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(runtime.run)
        while runtime.summary.acknowledged < total:  # noqa: ASYNC110 - polling a counter
            await anyio.sleep(0.05)
        elapsed = time.perf_counter() - started
        runtime.request_stop()
    return elapsed


def bench_publish(emulator: PubSubEmulator, messages: int) -> None:
    topic = emulator.topic("bench-publish")
    emulator.subscription("bench-publish", topic)  # so the emulator keeps what it receives
    env = {**os.environ, "PUBSUB_EMULATOR_HOST": emulator.host}
    result = subprocess.run(
        [sys.executable, "-m", "clickflow", "simulate", "--topic", topic, "--count", str(messages), "--seed", "20"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    print(f"publish: clickflow simulate --topic, unthrottled: {result.stderr.strip()}")


def bench_pull(emulator: PubSubEmulator, messages: int, workdir: Path) -> None:
    topic = emulator.topic("bench")
    raw = emulator.subscription("bench-raw", topic, ack_deadline=60)
    piped = emulator.subscription("bench-pipeline", topic, ack_deadline=60)
    payloads = list(VisitGenerator(seed=21).messages(messages))
    emulator.publish(topic, payloads)
    events = sum(p.count(b'"event_type"') for p in payloads)

    raw_seconds = anyio.run(raw_drain, emulator.host, raw, messages)
    os.environ["PUBSUB_EMULATOR_HOST"] = emulator.host
    runtime = Runtime(parse_pipeline(
        f"sources: [{{type: pubsub_pull, subscription: {piped}}}]\n"
        f"sinks: [{{type: duckdb, path: '{workdir}/pull.duckdb', batch: {{max_age: 1s}}}}]\n",
        load_plugins(), "bench.yaml", {},
    ))  # fmt: skip
    pipeline_seconds = anyio.run(pipeline_drain, runtime, messages)
    print(f"pull: {messages:,} visits ({events:,} events) through the emulator")
    print(f"  raw pull+acknowledge : {messages / raw_seconds:>9,.0f} msg/s")
    rate, event_rate = messages / pipeline_seconds, events / pipeline_seconds
    print(
        f"  clickflow pipeline   : {rate:>9,.0f} msg/s  {event_rate:>9,.0f} events/s (parsed, in DuckDB, acknowledged)"
    )


async def push_load(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, list[float], dict[int, int]]:
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    queue = list(reversed(bodies))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                started = time.perf_counter()
                async with session.post(url, data=body) as response:
                    await response.read()
                latencies.append(time.perf_counter() - started)
                statuses[response.status] = statuses.get(response.status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started, latencies, statuses


def bench_push(requests: int, concurrency: int, workdir: Path) -> None:
    port = free_port()
    pipeline = workdir / "push.yaml"
    pipeline.write_text(
        "sources: [{type: pubsub_push, auth: none}]\n"
        f"sinks: [{{type: duckdb, path: '{workdir}/push.duckdb'}}]\n"
        f"monitor: {{port: {port}}}\n"
    )
    server = subprocess.Popen([sys.executable, "-m", "clickflow", "run", str(pipeline), "--no-progress"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: ready(port), 30)
        bodies = [
            json.dumps({"message": {"data": base64.b64encode(data).decode(), "messageId": str(i)},
                        "subscription": "projects/bench/subscriptions/push"}).encode()
            for i, data in enumerate(VisitGenerator(seed=22).messages(requests))
        ]  # fmt: skip
        seconds, latencies, statuses = asyncio.run(
            push_load(f"http://127.0.0.1:{port}/pubsub/push", bodies, concurrency)
        )
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    print(f"push: {requests:,} requests, {concurrency} concurrent, from a separate process; statuses {statuses}")
    print(f"  {requests / seconds:,.0f} requests/s   latency p50 {pct(0.5):.1f} ms  p99 {pct(0.99):.1f} ms"
          f"  max {latencies[-1] * 1000:.1f} ms")  # fmt: skip


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--messages", type=int, default=50_000)
    args.add_argument("--push-requests", type=int, default=5_000)
    args.add_argument("--push-concurrency", type=int, default=32)
    opts = args.parse_args()

    launcher = pubsub_launcher()
    if launcher is None:
        sys.exit("the Pub/Sub emulator is not installed (apt-get install google-cloud-cli-pubsub-emulator)")
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        with running_pubsub_emulator(launcher, workdir / "emulator.log") as emulator:
            bench_publish(emulator, opts.messages)
            bench_pull(emulator, opts.messages, workdir)
        bench_push(opts.push_requests, opts.push_concurrency, workdir)


if __name__ == "__main__":
    main()
