"""The ``bigquery_load`` sink: one load job per table per batch, from newline-delimited JSON.

A batch is spooled to disk as it gathers. Writing it starts one load job per
table: the file is uploaded with the job (a resumable upload) or, with
``staging: gs://bucket/prefix``, copied to Cloud Storage and loaded from there.

Idempotency: a job's id is derived from its destination and the keys of its
rows (not the ingestion times), plus an attempt number. Before starting a job
the sink asks for that id: a finished job means the rows are already loaded
(a re-run, or a retry after a lost answer), a running one is waited for, a
failed one (load jobs are atomic: it loaded nothing) moves on to the next
attempt number. BigQuery also refuses a second job with the same id.

Rejected rows: when a job fails naming rows (by byte position, or by line on
emulators), those rows go to ``dead_letter`` with BigQuery's message and the rest
is loaded again under a new id.

Quota: BigQuery allows 1,500 load jobs per table per day. Jobs are spaced by a
token bucket per table (``jobs_per_table_per_day``, ``burst``) and batches are
large and slow to age (2 minutes) by default, so a steady stream uses about 720
jobs per table per day.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Annotated, Any, BinaryIO

import anyio
from msgspec import Meta

from clickflow.api import RowBatch, SinkContext
from clickflow.gcp import first_token, token_of
from clickflow.logs import describe
from clickflow.options import GCS_BUCKET, BatchLimits, ByteSize, Duration, PositiveInt
from clickflow.schema import TABLE_NAMES
from clickflow_bigquery.client import BigQueryError
from clickflow_bigquery.common import BigQueryOptions, BigQuerySink
from clickflow_bigquery.quota import JobBudget
from clickflow_bigquery.rows import ROW_ENCODERS, ROW_IDS, error_locations, json_row_id, rejected_row

log = logging.getLogger(__name__)

GS = rf"^gs://{GCS_BUCKET}(/.*)?$"


class BigQueryLoadOptions(BigQueryOptions, kw_only=True):
    staging: Annotated[str, Meta(pattern=GS)] | None = None
    """gs://bucket/prefix to stage files in."""
    jobs_per_table_per_day: Annotated[int, Meta(ge=1, le=1500)] = 1000
    """BigQuery's quota is 1,500."""
    burst: PositiveInt = 20
    """Jobs per table that may start back to back."""
    job_timeout: Duration = Duration(minutes=30)
    """How long to wait for one load job."""
    batch: BatchLimits = BatchLimits(max_rows=2_000_000, max_bytes=ByteSize(1 << 30), max_age=Duration(minutes=2))

    def write_spacing(self) -> timedelta:
        """Under steady load a table's jobs start a day divided by ``jobs_per_table_per_day`` apart."""
        return timedelta(days=1) / self.jobs_per_table_per_day


class TableFile:
    """One table's rows in a batch: JSON lines on disk, their count, and a digest of the row keys."""

    def __init__(self, directory: str, table: str) -> None:
        self.table = table
        self.path = os.path.join(directory, f"{table}.json")
        self._file: BinaryIO | None = None
        self._rows = 0
        self._keys = hashlib.sha256()
        self.loaded = False

    def add(self, rows: list[tuple[Any, ...]]) -> None:
        if rows:
            key_of = ROW_IDS[self.table]
            self._append(ROW_ENCODERS[self.table].lines(rows), len(rows), "\n".join(map(key_of, rows)))

    def _append(self, lines: bytes, rows: int, keys: str) -> None:
        """``rows`` JSON lines, each ending in a newline, and their keys, joined by newlines."""
        if self._file is None:
            self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close()
        self._file.write(lines)
        self._rows += rows
        self._keys.update(keys.encode() + b"\n")

    def __len__(self) -> int:
        return self._rows

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def job_id(self, destination: str, attempt: int) -> str:
        digest = hashlib.sha256(destination.encode() + b"\n" + self._keys.digest()).hexdigest()[:40]
        return f"clickflow_{self.table}_{digest}_{attempt}"

    def take(self, offsets: set[int], lines: set[int]) -> list[tuple[str, bytes]]:
        """Take out the rows at these byte offsets or 1-based line numbers: ``(key, json)`` each.
        The file is rewritten line by line: a large batch is never read into memory whole."""
        self.close()
        old = self.path + ".old"
        os.replace(self.path, old)
        self._rows, self._keys = 0, hashlib.sha256()
        key_of, taken, offset = json_row_id(self.table), [], 0
        with open(old, "rb") as source:
            for number, line in enumerate(source, 1):
                row = line.rstrip(b"\n")
                if offset in offsets or number in lines:
                    taken.append((key_of(row), row))
                else:
                    self._append(row + b"\n", 1, key_of(row))
                offset += len(line)
        os.unlink(old)
        self.close()
        return taken


class LoadBatch:
    """A batch for the load sink: one TableFile per table, in a directory of its own."""

    def __init__(self, root: str) -> None:
        self.directory = tempfile.mkdtemp(prefix="batch-", dir=root)
        self.files = {name: TableFile(self.directory, name) for name in TABLE_NAMES}

    def add(self, rows: RowBatch) -> None:
        for name, table_rows in rows.tables.items():
            if table_rows:
                self.files[name].add(table_rows)

    def __len__(self) -> int:
        return sum(len(f) for f in self.files.values())

    def counts(self) -> dict[str, int]:
        return {name: len(f) for name, f in self.files.items()}

    def discard(self) -> None:
        for table_file in self.files.values():
            table_file.close()
        shutil.rmtree(self.directory, ignore_errors=True)


class LoadJobFailed(Exception):
    """A load job failed without naming the rows at fault."""


class BigQueryLoadSink(BigQuerySink[BigQueryLoadOptions, LoadBatch]):
    """Loads each batch with one load job per table."""

    type_name = "bigquery_load"
    _spool: str | None = None
    _context: SinkContext | None = None

    async def open(self) -> None:
        await super().open()
        self._spool = tempfile.mkdtemp(prefix="clickflow-bigquery-")
        self._budgets = {
            name: JobBudget(self.options.jobs_per_table_per_day, self.options.burst) for name in TABLE_NAMES
        }
        self._storage = None
        if self.options.staging:
            from gcloud.aio.storage import Storage

            self._storage = Storage(service_file=self.options.service_file, session=self.client.session)
            await first_token(token_of(self._storage), "STORAGE_EMULATOR_HOST")

    @asynccontextmanager
    async def lifespan(self, context: SinkContext) -> AsyncIterator[None]:
        self._context = context  # told of the visits a job loaded already
        yield

    def new_batch(self) -> LoadBatch:
        assert self._spool is not None, "open() first"
        return LoadBatch(self._spool)

    async def write(self, batch: LoadBatch) -> None:
        for name in TABLE_NAMES:  # dead_letter last: it takes the rows the other tables' jobs refused
            table_file = batch.files[name]
            if len(table_file) and not table_file.loaded:
                table_file.close()
                await self._load(batch, table_file)
                table_file.loaded = True

    async def close(self) -> None:
        if self._spool is not None:
            shutil.rmtree(self._spool, ignore_errors=True)
        await super().close()

    async def _load(self, batch: LoadBatch, table_file: TableFile) -> None:
        table = self.names[table_file.table]
        destination = f"{self.options.project}.{self.options.dataset}.{table}"
        attempt = 0
        while len(table_file):
            job_id = table_file.job_id(destination, attempt)
            job = await self.client.get_job(job_id)
            submitted = job is None
            if job is None:
                await self._budgets[table_file.table].take(destination)
                job = await self._start(job_id, table, table_file)
            job = await self._wait(job_id, job)
            status = job["status"]
            if submitted:
                await self._unstage(job_id)
            if "errorResult" not in status:
                log.info("loaded %d rows into %s (job %s%s)", len(table_file), destination, job_id,
                         "" if submitted else ", done before")  # fmt: skip
                if not submitted and table_file.table == "visits" and self._context is not None:  # input read again
                    self._context.stored_already(len(table_file))
                return
            if not submitted:  # an earlier attempt failed, loading nothing: try the next id
                attempt += 1
                continue
            self._reject(batch, table_file, status)
            attempt = 0

    def _reject(self, batch: LoadBatch, table_file: TableFile, status: dict[str, Any]) -> None:
        """Move the rows a failed job names to dead_letter, or raise if it names none."""
        errors = [status["errorResult"], *status.get("errors", [])]
        message = "; ".join(dict.fromkeys(str(e.get("message", "")) for e in errors))
        taken = table_file.take(*error_locations(errors)) if table_file.table != "dead_letter" else []
        if not taken:
            raise LoadJobFailed(f"load job into {table_file.table} failed: {message}")
        now = time.time_ns() // 1000
        log.warning("BigQuery refused %d %s row(s), sent to dead_letter: %s", len(taken), table_file.table, message)
        batch.files["dead_letter"].add(
            [rejected_row(table_file.table, key, line, message, self.name, now) for key, line in taken]
        )

    def _job(self, job_id: str, table: str, source_uri: str | None) -> dict[str, Any]:
        load: dict[str, Any] = {
            "destinationTable": {
                "projectId": self.options.project,
                "datasetId": self.options.dataset,
                "tableId": table,
            },
            "sourceFormat": "NEWLINE_DELIMITED_JSON",
            "writeDisposition": "WRITE_APPEND",
            "createDisposition": "CREATE_NEVER",
            "ignoreUnknownValues": False,
            "maxBadRecords": 0,
        }
        if source_uri:
            load["sourceUris"] = [source_uri]
        reference = {"projectId": self.options.project, "jobId": job_id}
        if self.options.location:
            reference["location"] = self.options.location
        return {"jobReference": reference, "configuration": {"load": load}}

    async def _start(self, job_id: str, table: str, table_file: TableFile) -> dict[str, Any]:
        try:
            if self._storage is None:
                with open(table_file.path, "rb") as data:  # noqa: ASYNC230 - aiohttp reads it in a thread
                    return await self.client.upload_job(self._job(job_id, table, None), data)
            return await self.client.insert_job(self._job(job_id, table, await self._stage(job_id, table_file)))
        except BigQueryError as exc:
            if exc.status != 409:
                raise
            job = await self.client.get_job(job_id)  # started meanwhile (e.g. by a lost answer's request)
            if job is None:
                raise
            return job

    def _staged(self, job_id: str) -> tuple[str, str]:
        """Bucket and object name of a job's staged file."""
        assert self.options.staging
        bucket, _, prefix = self.options.staging.removeprefix("gs://").partition("/")
        return bucket, f"{prefix.rstrip('/')}/{job_id}.json".lstrip("/")

    async def _stage(self, job_id: str, table_file: TableFile) -> str:
        assert self._storage is not None
        bucket, name = self._staged(job_id)
        with open(table_file.path, "rb") as data:  # noqa: ASYNC230 - read by the upload, in a thread
            await self._storage.upload(bucket, name, data, content_type="application/x-ndjson", timeout=600)
        return f"gs://{bucket}/{name}"

    async def _unstage(self, job_id: str) -> None:
        if self._storage is not None:
            try:
                await self._storage.delete(*self._staged(job_id))
            except Exception as exc:  # the rows are loaded; a leftover file is only litter
                log.warning("could not delete the staged file of job %s: %s", job_id, describe(exc))

    async def _wait(self, job_id: str, job: dict[str, Any]) -> dict[str, Any]:
        delay, deadline = 0.2, anyio.current_time() + self.options.job_timeout.total_seconds()
        while job.get("status", {}).get("state") != "DONE":
            if anyio.current_time() > deadline:
                raise TimeoutError(f"load job {job_id} not done after {self.options.job_timeout}")
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)
            job = await self.client.get_job(job_id) or job
        return job
