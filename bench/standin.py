"""A fast local stand-in for the Pub/Sub and BigQuery REST APIs, for measuring clickflow's own
ceiling: the emulators are slower than clickflow, and real Pub/Sub serves far more than one worker
takes. Not a test double: it checks nothing, and only counts.

    python bench/standin.py --port 9999 --messages 200000

Pub/Sub: ``:pull`` answers with up to ``maxMessages`` of ``--messages`` simulated visits (each
response built from pre-encoded parts, every message with its own id), then holds empty pulls for
a second; ``:acknowledge`` and ``:modifyAckDeadline`` are counted. BigQuery: datasets and tables
exist (with clickflow's schema) and ``insertAll`` accepts everything, counting rows. ``GET /stats``
returns the counts as JSON, with the times of the first pull and of the last acknowledgement.
With ``--payload FILE`` every message's data is that file's bytes, and with ``--per-pull N`` a pull
response holds at most N messages (``bench_pull_memory.py``).
With ``--keys FILE``, ``GET /certs`` serves that file: the key set that push tokens are checked
against (``bench_push.py`` signs its tokens with the key).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import sys
import time
from pathlib import Path

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "plugins"))
from clickflow.schema import TABLES
from clickflow_bigquery.tables import table_resource
from clickflow_simulator import VisitGenerator

DISTINCT_PAYLOADS = 20_000
PUBLISH_TIME = b"2024-07-01T09:00:00.000Z"


class Counts:
    def __init__(self, total: int, seed: int, payload: bytes | None = None, per_pull: int | None = None) -> None:
        self.total = total
        self.served = self.acked = self.modacks = self.pulls = self.rows = self.inserts = 0
        self.first_pull: float | None = None
        self.last_ack: float | None = None
        self.per_pull = per_pull
        visits = [payload] if payload is not None else VisitGenerator(seed=seed).messages(min(total, DISTINCT_PAYLOADS))
        self.data = [base64.b64encode(v) for v in visits]

    def pull_body(self, wanted: int) -> bytes:
        """The JSON of a pull response with the next ``wanted`` messages (at most ``per_pull``)."""
        wanted = min(wanted, self.per_pull or wanted)
        start, end = self.served, min(self.total, self.served + wanted)
        self.served = end
        parts = []
        for n in range(start, end):
            number = str(n).encode()
            parts.append(b'{"ackId":"a' + number + b'","message":{"data":"' + self.data[n % len(self.data)]
                         + b'","messageId":"' + number + b'","publishTime":"' + PUBLISH_TIME + b'"}}')  # fmt: skip
        return b'{"receivedMessages":[' + b",".join(parts) + b"]}"


async def pull(request: web.Request) -> web.Response:
    counts: Counts = request.app["counts"]
    wanted = json.loads(await request.read()).get("maxMessages", 1000)
    counts.pulls += 1
    if counts.served >= counts.total:
        await asyncio.sleep(1)  # a held pull that finds nothing
        return web.Response(body=b"{}", content_type="application/json")
    counts.first_pull = counts.first_pull or time.perf_counter()
    return web.Response(body=counts.pull_body(wanted), content_type="application/json")


async def acknowledge(request: web.Request) -> web.Response:
    counts: Counts = request.app["counts"]
    counts.acked += len(json.loads(await request.read())["ackIds"])
    counts.last_ack = time.perf_counter()
    return web.json_response({})


async def modify_ack_deadline(request: web.Request) -> web.Response:
    request.app["counts"].modacks += len(json.loads(await request.read())["ackIds"])
    return web.json_response({})


async def subscription_call(request: web.Request) -> web.Response:
    handler = {"pull": pull, "acknowledge": acknowledge, "modifyAckDeadline": modify_ack_deadline}
    return await handler[request.match_info["verb"]](request)


async def dataset(request: web.Request) -> web.Response:
    return web.json_response({"id": request.match_info["dataset"]})


async def table(request: web.Request) -> web.Response:
    return web.json_response(table_resource(TABLES[request.match_info["table"]]))


async def insert_all(request: web.Request) -> web.Response:
    counts: Counts = request.app["counts"]
    # rows counted by their "insertId" keys (a value holding that text has its quotes escaped), not
    # by parsing the body: the stand-in shares the machine's two cores with the sink it measures
    counts.rows += (await request.read()).count(b'"insertId":')
    counts.inserts += 1
    return web.json_response({"kind": "bigquery#tableDataInsertAllResponse"})


async def certs(request: web.Request) -> web.Response:
    return web.Response(body=request.app["keys"], content_type="application/json")


async def stats(request: web.Request) -> web.Response:
    c: Counts = request.app["counts"]
    fields = ("total", "served", "acked", "modacks", "pulls", "rows", "inserts", "first_pull", "last_ack")
    return web.json_response({name: getattr(c, name) for name in fields})


def app(
    total: int, seed: int, keys: bytes, payload: bytes | None = None, per_pull: int | None = None
) -> web.Application:
    application = web.Application(client_max_size=64 * 1024 * 1024)
    application["counts"] = Counts(total, seed, payload, per_pull)
    application["keys"] = keys
    bigquery = "/bigquery/v2/projects/{project}/datasets/{dataset}"
    application.add_routes([
        web.post("/v1/projects/{project}/subscriptions/{name}:{verb}", subscription_call),
        web.get(bigquery, dataset),
        web.get(bigquery + "/tables/{table}", table),
        web.post(bigquery + "/tables/{table}/insertAll", insert_all),
        web.get("/stats", stats),
        web.get("/certs", certs),
    ])  # fmt: skip
    return application


if __name__ == "__main__":
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--port", type=int, required=True)
    args.add_argument("--messages", type=int, default=200_000)
    args.add_argument("--seed", type=int, default=31)
    args.add_argument("--keys", type=Path, help="a JSON key set to serve at /certs")
    args.add_argument("--payload", type=Path, help="a file whose bytes are every message's data")
    args.add_argument("--per-pull", type=int, help="at most this many messages in a pull response")
    opts = args.parse_args()
    keys = opts.keys.read_bytes() if opts.keys else b'{"keys": []}'
    payload = opts.payload.read_bytes() if opts.payload else None
    application = app(opts.messages, opts.seed, keys, payload, opts.per_pull)
    web.run_app(application, host="127.0.0.1", port=opts.port, print=None, access_log=None)
