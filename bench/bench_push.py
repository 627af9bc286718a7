"""The push endpoint under load from wrk, next to a bare aiohttp handler that answers 204 at once.

    python bench/bench_push.py [--seconds 10] [--concurrency 32 256] [--rounds 1]

Each server runs in a child process; wrk (Debian package `wrk`) sends push envelopes of a real
visit, each with its own message id. The bare handler runs on asyncio's loop and on uvloop's.
clickflow (on uvloop, its default) runs into DuckDB, answering 204 only once the request's rows
are stored; into DuckDB with `commit_every: 1s`, answering once the rows are fsynced to the
sink's log, once with new messages and once ("again") with 500 message ids per wrk thread sent
over and over, as Pub/Sub redelivers what was not acknowledged in time; and into the in-memory
`live` sink, which shows what the endpoint and the runtime cost without storage, on uvloop and on
asyncio's loop, and once with `auth: oidc` (the default, and a Cloud Run deployment's), every
request carrying a token signed by a key of the bench's own, served by the stand-in; and into
`bigquery_streaming`, `config/push.yaml`'s sink on Cloud Run, against
the fast local stand-in for BigQuery's REST API (`standin.py`, its own process, counting rows).
Requests that arrive together share a batch.
Prints requests/s and latency percentiles, the server's CPU seconds per 1,000 requests (its child
processes' included; steadier than rates on a shared machine), how busy its event loop's thread
was and its CPU per request (where it nears 100%, the rate is one over that time), how many
requests clickflow's batches held on average, and each clickflow rate as a share of each bare
handler's, in the same run. With ``--rounds N`` every server runs N times, in turn, and the shares
are the medians of each round's (with their range): on a shared machine one round's can move by
a fifth.
"""

from __future__ import annotations

import argparse
import base64
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench_pull import standin, stats  # this folder is on sys.path when run as a script
from cryptography.hazmat.primitives.asymmetric import rsa

from clickflow_simulator import VisitGenerator

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.emulators import free_port, metric, ready, wait_for
from tests.tokens import AUDIENCE, key_set, token

BARE = """
import sys
from aiohttp import web
async def handle(request):
    await request.read()
    return web.Response(status=204)
app = web.Application()
app.router.add_post("/pubsub/push", handle)
app.router.add_get("/readyz", lambda r: web.Response(text="ok"))
loop = None
if sys.argv[2] == "uvloop":
    import uvloop
    loop = uvloop.new_event_loop()
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None, loop=loop)
"""

LUA = """
local data = "%s"
local counter = 0
id = 0  -- a global: setup() gives each thread its own, so message ids never repeat within a run
function setup(thread) id = id + 1; thread:set("id", id) end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
%s
request = function()
  counter = counter %% %d + 1
  return wrk.format(nil, nil, nil, '{"message":{"data":"' .. data .. '","messageId":"%s-' .. id .. "-" .. counter ..
    '"},"subscription":"projects/bench/subscriptions/push"}')
end
"""


def keys_file(work: Path, key: Any) -> Path:
    """A file holding the public half of ``key`` as a JSON key set, for the stand-in to serve."""
    path = work / "keys.json"
    path.write_text(json.dumps(key_set(key)))
    return path


def milliseconds(text: str) -> float:
    found = re.match(r"([\d.]+)(us|ms|s|m)$", text)
    if found is None:
        raise SystemExit(f"cannot read wrk's latency {text!r}")
    value, unit = found.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def _stat_seconds(stat: Path) -> float:
    """User and system CPU time from a /proc ``stat`` file (a process's, or one of its threads')."""
    fields = stat.read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """CPU time (user and system, every thread) a process and its children (the DuckDB sink's log
    writer) have used so far, from /proc."""
    tasks = Path(f"/proc/{pid}/task").iterdir()
    children = [int(child) for task in tasks for child in (task / "children").read_text().split()]
    return _stat_seconds(Path(f"/proc/{pid}/stat")) + sum(map(cpu_seconds, children))


def loop_seconds(pid: int) -> float:
    """CPU time the process's main thread, its event loop, has used so far, from /proc."""
    return _stat_seconds(Path(f"/proc/{pid}/task/{pid}/stat"))


def batched(port: int) -> tuple[float, float]:
    """A clickflow server's push requests and batches so far, from its /metrics."""
    return metric(port, "clickflow_push_batch_requests_sum"), metric(port, "clickflow_push_batch_requests_count")


def wrk(port: int, script: Path, connections: int, seconds: int) -> tuple[float, int, float, float, str]:
    out = subprocess.run(
        ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
         f"http://127.0.0.1:{port}/pubsub/push"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    p50 = milliseconds(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = milliseconds(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return rate, requests, p50, p99, f", {errors.group(1)} non-2xx" if errors else ""


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--seconds", type=int, default=10)
    args.add_argument("--concurrency", type=int, nargs="+", default=[32, 256])
    args.add_argument("--rounds", type=int, default=1, help="run every server this many times, in turn")
    opts = args.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (apt-get install wrk)")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with tempfile.TemporaryDirectory() as tmp, standin(0, keys_file(Path(tmp), key)) as bigquery:
        work = Path(tmp)
        visit = next(VisitGenerator(seed=22).messages(1))
        data = base64.b64encode(visit).decode()
        replay = work / "replay.lua"
        replay.write_text(LUA % (data, "", 500, "again"))
        bearer = token(key, exp=int(time.time()) + 3600)  # as Pub/Sub's: valid for an hour, the whole run
        authorization = f'wrk.headers["Authorization"] = "Bearer {bearer}"'

        def new_ids(run: str, headers: str = "") -> Path:
            """A wrk script whose message ids no other wrk run sends (each run's prefix is its own)."""
            script = work / f"push-{run}.lua"
            script.write_text(LUA % (data, headers, 2**53, run))
            return script

        def clickflow(
            name: str, sink: str, event_loop: str = "auto", auth: str = "auth: none"
        ) -> tuple[list[str], int]:
            port = free_port()
            pipeline = work / f"{name}.yaml"
            pipeline.write_text(
                f"sources: [{{type: pubsub_push, {auth}, enter_timeout: 10s}}]\n"
                f"sinks: [{{{sink}}}]\n"
                f"monitor: {{port: {port}}}\nruntime: {{event_loop: {event_loop}}}\n"
            )
            return [sys.executable, "-m", "clickflow", "run", str(pipeline), "--no-progress"], port

        def bare(event_loop: str) -> tuple[list[str], int]:
            port = free_port()
            return [sys.executable, "-c", BARE, str(port), event_loop], port

        environment = {**os.environ, "BIGQUERY_EMULATOR_HOST": f"127.0.0.1:{bigquery}"}

        bare_names = ("bare aiohttp 204", "bare aiohttp 204, uvloop")
        servers: dict[str, tuple[list[str], int]] = {
            bare_names[0]: bare("asyncio"),
            bare_names[1]: bare("uvloop"),
            # the endpoint and the runtime with a sink that only counts in memory: their own ceiling
            "clickflow push -> live": clickflow("live", "type: live"),
            "clickflow push -> live, asyncio": clickflow("live-asyncio", "type: live", "asyncio"),
            # every request with a token to check, as on Cloud Run
            "clickflow push -> live, oidc": clickflow(
                "live-oidc", "type: live", auth=f"audience: '{AUDIENCE}', keys_url: 'http://127.0.0.1:{bigquery}/certs'"
            ),
            "clickflow push -> duckdb": clickflow("duckdb", f"type: duckdb, path: '{work}/push.duckdb'"),
            # each batch fsynced to the sink's log and answered; the log inserted once a second
            "clickflow push -> duckdb log": clickflow(
                "duckdb-log", f"type: duckdb, path: '{work}/log.duckdb', commit_every: 1s"
            ),
            "clickflow push -> duckdb log, again": clickflow(
                "duckdb-again", f"type: duckdb, path: '{work}/again.duckdb', commit_every: 1s"
            ),
            "clickflow push -> bigquery_streaming": clickflow(
                "bigquery", "type: bigquery_streaming, project: bench, dataset: clickstream"
            ),
        }
        scripts = {"clickflow push -> duckdb log, again": replay}
        headers = {"clickflow push -> live, oidc": authorization}
        rates: dict[str, dict[int, list[float]]] = {}
        for round_, (name, (command, server_port)) in itertools.product(range(opts.rounds), servers.items()):
            server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=environment)
            try:
                wait_for(partial(ready, server_port), 30)
                for connections in opts.concurrency:
                    before = None if name in bare_names else batched(server_port)  # bare: no /metrics
                    cpu, loop, started = cpu_seconds(server.pid), loop_seconds(server.pid), time.monotonic()
                    script = scripts.get(name) or new_ids(f"{round_}.{connections}", headers.get(name, ""))
                    rate, requests, p50, p99, notes = wrk(server_port, script, connections, opts.seconds)
                    cpu, loop = cpu_seconds(server.pid) - cpu, loop_seconds(server.pid) - loop
                    busy = loop / (time.monotonic() - started)  # over wrk's whole run, not its nominal seconds
                    notes = f", event loop busy {busy:.0%} ({loop / requests * 1e6:.0f} µs a request)" + notes
                    if before is not None:
                        pushed, batches = (now - then for now, then in zip(batched(server_port), before, strict=True))
                        notes += f", {pushed / batches:.1f} requests per batch"
                    rates.setdefault(name, {}).setdefault(connections, []).append(rate)
                    print(f"{name:<36} {connections:>4} concurrent: {rate:>8,.0f} requests/s, p50 {p50:.1f} ms, "
                          f"p99 {p99:.1f} ms, {cpu / requests * 1e3:.3f} CPU s per 1,000{notes}")  # fmt: skip
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=60)
                for stored in work.glob("*.duckdb*"):  # each server starts on new files, in every round
                    if stored.is_dir():
                        shutil.rmtree(stored)
                    else:
                        stored.unlink()
        took = stats(bigquery)
        print(f"the BigQuery stand-in took {took['rows']:,.0f} rows in {took['inserts']:,.0f} insertAll calls")
        bares = {name: rates.pop(name) for name in bare_names}
        for bare_name, bare_rates in bares.items():
            for connections in opts.concurrency:
                shares = ", ".join(
                    f"{name} {share(ours[connections], bare_rates[connections])}" for name, ours in rates.items()
                )
                print(f"{connections} concurrent, share of the {bare_name!r} rate: {shares}")


def share(ours: list[float], bare: list[float]) -> str:
    """Each round's rate over the bare handler's in the same round: one, or their median and range."""
    shares = sorted(mine / theirs for mine, theirs in zip(ours, bare, strict=True))
    if len(shares) == 1:
        return f"{shares[0]:.0%}"
    return f"{statistics.median(shares):.0%} ({shares[0]:.0%} to {shares[-1]:.0%})"


if __name__ == "__main__":
    main()
