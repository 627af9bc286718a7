"""The ``bigquery_write`` sink (Storage Write API) against the BigQuery emulator's gRPC server:
exact counts in both modes and both row formats, a pending batch cut before its commit leaves
nothing, a connection cut mid-append is retried; refused rows (which the emulator never
produces) with a fake."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import anyio
import pytest

from clickflow.api import Message, content_id
from clickflow.config import Pipeline
from clickflow.parser import VisitParser, visit_id_for
from clickflow.summary import RunSummary
from clickflow_bigquery.write import BigQueryWriteOptions, BigQueryWriteSink, WriteBatch
from tests.conftest import VALID_VISIT, files_into
from tests.faults import ConnectionCutter
from tests.gcp_emulators import BigQueryEmulator, new_dataset

pytestmark = pytest.mark.integration

Write = Callable[..., tuple[RunSummary, str]]


@pytest.fixture
def write(
    bigquery_env: BigQueryEmulator,
    mixed_visits: tuple[Path, dict[str, int]],
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
) -> Write:
    """``write(options)``: the mixed visits through a bigquery_write sink into a new dataset."""

    def run(options: str) -> tuple[RunSummary, str]:
        name = new_dataset("write")
        sink = (f"type: bigquery_write, project: {bigquery_env.project}, dataset: {name}, "
                f"retry: {{attempts: 4, initial_backoff: 10ms}}, {options}")  # fmt: skip
        return clickflow_run(pipeline(files_into(mixed_visits[0], sink))), name

    return run


@pytest.mark.parametrize("mode", ["default", "pending"])
@pytest.mark.parametrize("row_format", ["proto", "arrow"])
def test_every_table_gets_exact_counts(
    bigquery_env: BigQueryEmulator, mixed_visits: tuple[Path, dict[str, int]], write: Write, mode: str, row_format: str
) -> None:
    summary, name = write(f"mode: {mode}, row_format: {row_format}, batch: {{max_rows: 700}}")
    assert summary.rows == mixed_visits[1] and summary.not_acknowledged == 0
    assert bigquery_env.counts(name) == mixed_visits[1]
    stamps = bigquery_env.query(f"SELECT MIN(event_timestamp) AS t FROM `{name}.events`")
    assert int(stamps[0]["t"]) > 1_600_000_000_000_000  # microseconds, read as such


def test_small_requests_split_a_batch_on_bytes(
    bigquery_env: BigQueryEmulator, mixed_visits: tuple[Path, dict[str, int]], write: Write
) -> None:
    _, name = write("mode: pending, max_request_bytes: 1MiB, batch: {max_rows: 100000}")
    assert bigquery_env.counts(name) == mixed_visits[1]


def parsed_visits(count: int) -> Any:
    messages = [Message(json.dumps(VALID_VISIT).encode(), f"m{i}") for i in range(count)]
    return VisitParser().parse(messages, "test", 1_719_824_400_000_000)


def test_a_pending_batch_cut_before_its_commit_leaves_nothing_and_its_retry_stores_it_once(
    bigquery_env: BigQueryEmulator,
) -> None:
    name = new_dataset("pending")
    sink = BigQueryWriteSink("w", BigQueryWriteOptions(project=bigquery_env.project, dataset=name, mode="pending"))
    rows = parsed_visits(50)

    async def run() -> None:
        await sink.open()
        try:
            batch = sink.new_batch()
            batch.add(rows)
            assert sink._writer is not None
            commit = sink._writer.batch_commit_write_streams

            async def killed(*args: Any, **kwargs: Any) -> Any:
                raise ConnectionAbortedError("the process died before the commit")

            sink._writer.batch_commit_write_streams = killed  # type: ignore[method-assign]
            with pytest.raises(ConnectionAbortedError):
                await sink.write(batch)
            visible = await anyio.to_thread.run_sync(bigquery_env.counts, name)
            assert set(visible.values()) == {0}  # appended, finalized, never visible
            sink._writer.batch_commit_write_streams = commit  # type: ignore[method-assign]
            await sink.write(batch)
            await sink.write(batch)  # a write retried after its commit: every table is done already
        finally:
            await sink.close()

    anyio.run(run)
    assert bigquery_env.counts(name) == rows.counts()


@pytest.mark.parametrize("mode", ["default", "pending"])
def test_a_connection_cut_mid_append_is_retried_without_loss(
    bigquery_env: BigQueryEmulator,
    mixed_visits: tuple[Path, dict[str, int]],
    write: Write,
    monkeypatch: pytest.MonkeyPatch,
    mode: str,
) -> None:
    cutter = ConnectionCutter(bigquery_env.grpc_host, cuts=1, after=2048)
    with cutter.running() as host:
        monkeypatch.setenv("BIGQUERY_STORAGE_EMULATOR_HOST", host)
        summary, name = write(f"mode: {mode}")
    assert cutter.cut == 1
    assert summary.not_acknowledged == 0
    counts = bigquery_env.counts(name)
    if mode == "pending":
        assert counts == mixed_visits[1]  # the cut batch was never committed
    else:  # at least once: rows appended before the cut may be appended again
        assert all(counts[t] >= n for t, n in mixed_visits[1].items())
        distinct = bigquery_env.query(f"SELECT COUNT(DISTINCT event_id) AS n FROM `{name}.events`")
        assert int(distinct[0]["n"]) == mixed_visits[1]["events"]


class RefusingWriter:
    """A Write API that refuses, once, the rows whose ``visit_id`` is in ``refuse`` (the whole
    request fails, as BigQuery does), and otherwise keeps what it is sent."""

    def __init__(self, refuse: set[str]) -> None:
        self.refuse = refuse
        self.appended: dict[str, int] = {}
        self.transport = SimpleNamespace(close=self._close)

    async def _close(self) -> None:
        pass

    async def append_rows(self, requests: Any) -> Any:
        async def answers() -> Any:
            async for request in requests:
                table = request.write_stream.split("/tables/")[1].split("/")[0]
                rows = list(request.proto_rows.rows.serialized_rows)
                bad = [i for i, row in enumerate(rows) if any(v.encode() in row for v in self.refuse)]
                if bad and table != "dead_letter":
                    self.refuse.clear()
                    errors = [SimpleNamespace(index=i, message=f"row {i} is invalid") for i in bad]
                    yield SimpleNamespace(row_errors=errors, error=SimpleNamespace(code=0))
                    continue
                self.appended[table] = self.appended.get(table, 0) + len(rows)
                yield SimpleNamespace(row_errors=[], error=SimpleNamespace(code=0, message=""))

        return answers()


def test_rows_bigquery_refuses_become_dead_letters_and_the_rest_is_appended() -> None:
    rows = parsed_visits(3)
    refused = rows.tables["visits"][1][0]
    sink = BigQueryWriteSink("w", BigQueryWriteOptions(project="p", dataset="d"))
    sink.names = {name: name for name in rows.tables}
    sink._writer = RefusingWriter({refused})  # type: ignore[assignment]
    from clickflow.schema import TABLES
    from clickflow_bigquery.rowformats import row_format

    sink._formats = {name: row_format("proto", table) for name, table in TABLES.items()}
    sink._default = {}
    batch = WriteBatch()
    batch.add(rows)

    async def write() -> None:
        await sink.write(batch)
        await sink.close_connections()

    anyio.run(write)
    appended = sink._writer.appended  # type: ignore[attr-defined]
    assert appended["visits"] == 2 and appended["dead_letter"] == 1
    (dead,) = batch.tables["dead_letter"]
    assert dead[0] == f"visits/{refused}" and dead[5] == "bigquery_rejected" and "row 1 is invalid" in dead[6]


@pytest.mark.parametrize("mode", ["default", "pending"])
@pytest.mark.parametrize("row_format", ["proto", "arrow"])
def test_a_row_too_large_for_any_request_is_a_dead_letter_of_its_head(
    bigquery_env: BigQueryEmulator,
    pipeline: Callable[..., Pipeline],
    clickflow_run: Callable[[Pipeline], RunSummary],
    tmp_path: Path,
    mode: str,
    row_format: str,
) -> None:
    """A message of 9 MB that is not JSON is kept whole as a dead letter, 12 MB in base64: its
    request was refused ("larger than max", 12,583,503 bytes against the emulator's 11,534,336;
    BigQuery takes 10 MB), every retry alike, and the sink failed the run."""
    source = tmp_path / "large.jsonl"
    source.write_bytes(b"x" * (9 << 20) + b"\n" + json.dumps(VALID_VISIT).encode() + b"\n")
    name = new_dataset("large")
    sink = (f"type: bigquery_write, project: {bigquery_env.project}, dataset: {name}, mode: {mode}, "
            f"row_format: {row_format}, retry: {{attempts: 2, initial_backoff: 10ms}}")  # fmt: skip
    summary = clickflow_run(pipeline(files_into(source, sink)))
    assert summary.not_acknowledged == 0 and summary.dead_letters == {"invalid_json": 1}
    counts = bigquery_env.counts(name)
    assert (counts["visits"], counts["dead_letter"]) == (1, 1)
    (dead,) = bigquery_env.query(f"SELECT dead_letter_id, reason, error, payload FROM `{name}.dead_letter`")
    assert dead["dead_letter_id"] == "dead_letter/" + visit_id_for(content_id(f"{source}:1", b"x" * (9 << 20)))
    assert dead["reason"] == "too_large" and "is over max_request_bytes" in dead["error"]
    assert len(dead["payload"]) == 64 * 1024
