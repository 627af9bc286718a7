"""How often a SIGKILL leaves duplicates behind: `pubsub_pull -> bigquery_write` in each mode,
against the Pub/Sub and BigQuery emulators.

    python bench/bench_kill_window.py [--trials 8] [--messages 4000]

Each trial publishes --messages visits to a new subscription, starts `clickflow run`, kills it
with SIGKILL at a random moment while it writes, then runs a second worker until every visit is
stored (nothing lost), and counts the visits stored more than once. In `pending` mode a
duplicate needs the kill to land between a batch's commit and its acknowledgement; in `default`
mode, anywhere between an append and the acknowledgement. Printed per mode: the trials that left
duplicates, and the duplicate visits in all.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from clickflow_bigquery.client import BigQueryError
from tests.emulators import (
    CLICKFLOW,
    REPO,
    expected_counts,
    free_port,
    metric,
    pubsub_launcher,
    running_pubsub_emulator,
    simulated_visits,
    wait_for,
)
from tests.gcp_emulators import bqemulator, running_bigquery_emulator

OUT = Path(__file__).resolve().parent / "out" / "kill"


def worker(pipeline: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    with open(pipeline.with_suffix(".log"), "ab") as log:
        return subprocess.Popen([*CLICKFLOW, "run", str(pipeline)], cwd=REPO, env=env, stdout=log, stderr=log)


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--trials", type=int, default=8)
    args.add_argument("--messages", type=int, default=4000)
    args.add_argument("--seed", type=int, default=7)
    opts = args.parse_args()
    rng = random.Random(opts.seed)
    OUT.mkdir(parents=True, exist_ok=True)
    for old in OUT.iterdir():
        old.unlink()
    launcher, bq_launcher = pubsub_launcher(), bqemulator()
    if launcher is None or bq_launcher is None:
        sys.exit("needs the Pub/Sub emulator and the BigQuery emulator")
    with tempfile.TemporaryDirectory() as tmp, running_pubsub_emulator(launcher, Path(tmp) / "pubsub.log") as pubsub:
        payloads = simulated_visits(opts.messages, seed=opts.seed)
        for mode in ("pending", "default"):
            hit, duplicates = 0, 0
            for trial in range(opts.trials):
                name = f"kill_{mode}_{trial}"
                # an emulator of its own: the emulator's Write API stalls after enough clients died mid-call
                with running_bigquery_emulator(bq_launcher, OUT / f"{name}.emulator.log", Path(tmp)) as bigquery:
                    stored, distinct, expected, acknowledged = one_trial(pubsub, bigquery, name, mode, payloads, rng)
                hit += stored > distinct
                duplicates += stored - distinct
                print(f"{mode:<8} trial {trial}: killed after {acknowledged:,} acknowledged; {distinct:,} of "
                      f"{expected:,} visits stored, {stored - distinct:,} of them twice")  # fmt: skip
            print(f"{mode}: {hit} of {opts.trials} kills left duplicates ({duplicates:,} duplicate visits in all)")


def one_trial(
    pubsub: Any, bigquery: Any, name: str, mode: str, payloads: list[bytes], rng: random.Random
) -> tuple[int, int, int, int]:
    """Publish, kill a worker while it writes, drain with another: (visits stored, distinct,
    expected, messages the killed worker had acknowledged)."""
    topic = pubsub.topic(name)
    subscription = pubsub.subscription(name, topic, ack_deadline=10)
    expected = expected_counts(payloads, pubsub.publish(topic, payloads))["visits"]
    port = free_port()
    pipeline = OUT / f"{name}.yaml"  # beside its worker's log
    pipeline.write_text(
        f"sources: [{{type: pubsub_pull, subscription: {subscription}, ack_deadline: 10s}}]\n"
        f"sinks: [{{type: bigquery_write, project: {bigquery.project}, dataset: {name}, mode: {mode}, "
        f"batch: {{max_age: 200ms}}}}]\nmonitor: {{port: {port}}}\n"
    )
    env = {**os.environ, "PUBSUB_EMULATOR_HOST": pubsub.host, "BIGQUERY_EMULATOR_HOST": bigquery.host,
           "BIGQUERY_STORAGE_EMULATOR_HOST": bigquery.grpc_host}  # fmt: skip
    first = worker(pipeline, env)
    wait_for(lambda: metric(port, "clickflow_messages_acknowledged_total") > 0, 120)
    time.sleep(rng.uniform(0.0, 2.0))
    acknowledged = int(metric(port, "clickflow_messages_acknowledged_total"))
    first.send_signal(signal.SIGKILL)
    first.wait()

    def counts() -> tuple[int, int]:
        rows = bigquery.query(f"SELECT COUNT(*) AS n, COUNT(DISTINCT visit_id) AS d FROM `{name}.visits`")
        return int(rows[0]["n"]), int(rows[0]["d"])

    def all_stored() -> bool:
        try:
            return counts()[1] == expected
        except BigQueryError:  # the emulator fails a query now and then while it is written to
            return False

    second = worker(pipeline, env)
    try:  # drained once every visit is stored: the second worker acknowledges only what it stored
        wait_for(all_stored, 180)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(timeout=60)
    return (*counts(), expected, acknowledged)


if __name__ == "__main__":
    main()
