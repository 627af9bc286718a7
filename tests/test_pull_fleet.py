"""A fleet of pull workers on one subscription, as deploy/gce and deploy/k8s run it, shown locally:
three ``clickflow run config/pull-duckdb.yaml`` processes against the Pub/Sub emulator, each writing
a DuckDB file of its own, share the backlog; one is killed mid-stream and nothing is lost."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import duckdb
import pytest

from clickflow.schema import TABLES
from tests.emulators import REPO, PubSubEmulator, free_port, metric, start_clickflow, wait_for, wait_until_quiet

pytestmark = pytest.mark.integration

MESSAGES = 30_000
ACK_DEADLINE = 10  # seconds: how long the killed worker's messages stay leased to it


def stored_keys(databases: list[Path]) -> dict[str, list[tuple[str, int]]]:
    """Every stored row's key and the worker that stored it, per table, across the workers' files."""
    with duckdb.connect() as con:
        for n, db in enumerate(databases):
            con.execute(f"ATTACH '{db}' AS w{n} (READ_ONLY)")
        rows: dict[str, list[tuple[str, int]]] = {}
        for table in TABLES.values():
            key = " || ':' || ".join(f"CAST({column} AS VARCHAR)" for column in table.key)
            union = " UNION ALL ".join(f"SELECT {key}, {n} FROM w{n}.{table.name}" for n in range(len(databases)))
            rows[table.name] = con.execute(union).fetchall()
    return rows


def test_three_workers_share_one_subscription_and_a_killed_one_loses_nothing(
    pubsub_emulator: PubSubEmulator, tmp_path: Path
) -> None:
    subscription, expected = pubsub_emulator.published_visits("fleet", MESSAGES, seed=21)
    databases = [tmp_path / f"worker{n}.duckdb" for n in range(3)]
    ports = [free_port() for _ in databases]
    workers: list[subprocess.Popen[str]] = []
    for db, port in zip(databases, ports, strict=True):
        env = {"PROJECT_ID": pubsub_emulator.project, "SUBSCRIPTION": subscription.rsplit("/", 1)[1],
               "CLICKFLOW_DUCKDB": str(db), "PORT": str(port), "ACK_DEADLINE": f"{ACK_DEADLINE}s"}  # fmt: skip
        workers.append(start_clickflow(REPO / "config" / "pull-duckdb.yaml", pubsub_emulator.host, env))
    try:
        wait_for(lambda: all(metric(p, "clickflow_messages_acknowledged_total") > 0 for p in ports), 60)
        held = metric(ports[0], "clickflow_messages_received_total")
        workers[0].kill()  # SIGKILL: no drain, no acknowledgement of what it held
        workers[0].communicate()
        wait_until_quiet(ports[1:], quiet=ACK_DEADLINE + 3)
        for worker in workers[1:]:
            worker.send_signal(signal.SIGTERM)
        outcomes = [worker.communicate(timeout=60) for worker in workers[1:]]
    finally:
        for worker in workers:
            worker.kill()
    for worker, (_, stderr) in zip(workers[1:], outcomes, strict=True):
        assert worker.returncode == 0, stderr

    rows = stored_keys(databases)
    for table, count in expected.items():
        assert len({key for key, _ in rows[table]}) == count, table
    share = [sum(1 for _, worker in rows["visits"] if worker == n) for n in range(3)]
    assert all(share), f"every worker stored some visits: {share}"
    # At-least-once: only what the killed worker wrote but had not acknowledged is stored twice,
    # with the same keys, so a query (or BigQuery's insertId) counts it once.
    by_key: dict[str, set[int]] = {}
    for key, worker in rows["visits"]:
        by_key.setdefault(key, set()).add(worker)
    twice = {key: found for key, found in by_key.items() if len(found) > 1}
    assert all(0 in found for found in twice.values()), "the surviving workers never share a message"
    print(
        f"visits stored per worker {share}; worker 0 had received {held:,.0f} when killed; "
        f"{len(twice)} visits stored by it and again by a survivor"
    )
