"""The push endpoint's peak memory under a burst of its costliest messages, for each ``max_pending_bytes``.

    python bench/bench_push_memory.py [--requests 14] [--pending 128MiB 64MiB 32MiB]

Whoever can publish to the topic chooses what is in a message. Each burst is ``--requests`` push
requests at once, each a visit of as many page views as a visit may carry (``parser.MAX_ROWS``),
whose ``session_id``, ``user_id`` and ``device_type`` are as long as the parser takes them
(``fastpath.REPEATED_CHARS``): every event row repeats them, so a 4.4 MB message (5.9 MB as an
envelope) is 50 MB of rows as JSON. Into ``bigquery_streaming`` against the fast local stand-in
(``standin.py``), as on Cloud Run (``config/push.yaml``). For each ``max_pending_bytes`` it prints
how many requests were stored (204) and refused (429), and the server's peak resident memory
(``VmHWM``), beside the same server's after one small visit: what Cloud Run's memory limit (1 GiB
in ``deploy/cloudrun``) must hold.
"""

from __future__ import annotations

import argparse
import base64
import collections
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench_pull import standin  # this folder is on sys.path when run as a script

from clickflow.fastpath import REPEATED_CHARS
from clickflow.parser import MAX_ROWS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.emulators import free_port, ready, wait_for

EVENT = b'{"event_type":"page_view","timestamp":"2024-07-01T09:00:00","details":{"page_url":"u"}}'
LONG = b"x" * (REPEATED_CHARS - 8)


def envelope(number: int, events: int = MAX_ROWS - 1) -> bytes:
    """A push request of a visit of ``events`` page views whose repeated fields are as long as allowed."""
    ids = b'"session_id":"%s%08d","user_id":"%s%08d","device_type":"%s%08d"' % ((LONG, number) * 3)
    visit = b'{%s,"events":[%s]}' % (ids, b",".join([EVENT] * events))
    message = {"data": base64.b64encode(visit).decode(), "messageId": f"m{number}-{events}"}
    return json.dumps({"message": message, "subscription": "projects/bench/subscriptions/push"}).encode()


def peak_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])


def burst(port: int, bodies: list[Path]) -> collections.Counter[str]:
    """Each body pushed at once by a curl of its own, which reads a 429 sent before the body is
    read (Python's clients report the connection closed under them); their answers counted."""
    url = f"http://127.0.0.1:{port}/pubsub/push"
    curls = [
        subprocess.Popen(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Content-Type: application/json",
                          "--data-binary", f"@{body}", url], stdout=subprocess.PIPE, text=True)
        for body in bodies
    ]  # fmt: skip
    return collections.Counter(curl.communicate()[0] for curl in curls)


def run(pending: str, bodies: list[Path], small_body: Path, work: Path, bigquery: int) -> str:
    port = free_port()
    pipeline = work / "push.yaml"
    pipeline.write_text(
        f"sources: [{{type: pubsub_push, auth: none, enter_timeout: 60s, max_pending_bytes: {pending}}}]\n"
        "sinks: [{type: bigquery_streaming, project: bench, dataset: clickstream}]\n"
        f"monitor: {{port: {port}}}\n"
    )
    environment = {**os.environ, "BIGQUERY_EMULATOR_HOST": f"127.0.0.1:{bigquery}"}
    command = [sys.executable, "-m", "clickflow", "run", str(pipeline), "--no-progress"]
    server = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: ready(port), 60)
        burst(port, [small_body])
        small = peak_kb(server.pid)
        answers = burst(port, bodies)
        large = peak_kb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=60)
    counts = ", ".join(f"{answers[status]} answered {status}" for status in sorted(answers))
    peaks = f"peak {large / 1024:,.0f} MB (one small visit: {small / 1024:,.0f} MB)"
    return f"max_pending_bytes {pending:>7}: {counts}; {peaks}"


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--requests", type=int, default=14)
    args.add_argument("--pending", nargs="+", default=["128MiB", "64MiB", "32MiB"])
    opts = args.parse_args()
    with tempfile.TemporaryDirectory() as tmp, standin(0) as bigquery:
        work = Path(tmp)
        bodies = [work / f"{n}.json" for n in range(opts.requests + 1)]
        for n, body in enumerate(bodies):
            body.write_bytes(envelope(n) if n else envelope(n, 10))
        size = bodies[1].stat().st_size
        print(f"{opts.requests} push requests at once, each {size / 1e6:.1f} MB ({MAX_ROWS - 1:,} page views)")
        for pending in opts.pending:
            print(run(pending, bodies[1:], bodies[0], work, bigquery), flush=True)


if __name__ == "__main__":
    main()
