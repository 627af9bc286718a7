"""The BigQuery REST calls the sinks make, over one aiohttp session.

gcloud-aio-bigquery makes the management calls (datasets, tables, jobs) and
gcloud-aio-auth supplies tokens (application default credentials or a
service-account file). Two calls are made here directly: ``insertAll``, whose
body is assembled from rows already encoded by msgspec so that requests can be
split by their exact size, and the resumable upload of a load job's data, for
which gcloud-aio-bigquery has no helper.

``BIGQUERY_EMULATOR_HOST`` points every call at an emulator, without credentials.
gcloud-aio and aiohttp are imported when a client is made, so the plugin loads
without the ``gcp`` extra (Beam workers import its row helpers) and quickly
(``clickflow validate`` does not pay for aiohttp's client).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from typing import IO, TYPE_CHECKING, Any

import msgspec

from clickflow.gcp import first_token

if TYPE_CHECKING:
    import aiohttp
    from gcloud.aio.bigquery import Job, Table

TIMEOUT = 120


class BigQueryError(Exception):
    """An error answer from BigQuery, with its HTTP status and BigQuery's reason."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"BigQuery answered {status} {reason}: {message}")
        self.status = status
        self.reason = reason


def _error(status: int, body: str) -> BigQueryError:
    """The error an answer's body describes (Google's JSON error format, or plain text)."""
    reason, message = "", body
    try:
        error = json.loads(body)["error"]
        message = error.get("message", message)
        reason = (error.get("errors") or [{}])[0].get("reason", "") or error.get("status", "")
    except (ValueError, KeyError, TypeError, AttributeError):
        pass
    return BigQueryError(status, reason, message)


class BigQueryClient:
    """One project's BigQuery API, on a session made by ``open`` (or ``async with``)."""

    _open = False

    def __init__(self, project: str, service_file: str | None = None, location: str | None = None) -> None:
        self.project = project
        self.location = location
        self._service_file = service_file
        from gcloud.aio.bigquery.bigquery import init_api_root

        self._emulated, self._root = init_api_root(None)
        self._upload_root = self._root.replace("/bigquery/v2", "/upload/bigquery/v2")

    async def open(self) -> None:
        import aiohttp
        from gcloud.aio.auth import Token
        from gcloud.aio.bigquery.bigquery import SCOPES

        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT))
        self._open = True
        self.token = (
            None if self._emulated else Token(service_file=self._service_file, scopes=SCOPES, session=self.session)
        )
        try:
            await first_token(self.token, "BIGQUERY_EMULATOR_HOST")
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Once, whatever the number of calls: ``open`` closes what it made if it fails, and the
        sink that opened it closes it again."""
        if not self._open:
            return
        self._open = False
        if self.token is not None:
            await self.token.close()
        await self.session.close()

    async def __aenter__(self) -> BigQueryClient:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _headers(self) -> dict[str, str]:
        return {} if self.token is None else {"Authorization": f"Bearer {await self.token.get()}"}

    def _common(self) -> dict[str, Any]:
        return {"project": self.project, "session": self.session, "token": self.token}

    async def _call(self, method: str, url: str, **kwargs: Any) -> aiohttp.ClientResponse:
        headers = {**kwargs.pop("headers", {}), **await self._headers()}
        try:
            response = await self.session.request(method, url, headers=headers, **kwargs)
            if response.status >= 400:
                body = await response.text(errors="replace")
                response.release()
                raise _error(response.status, body)
        except TimeoutError:
            raise self._no_answer() from None
        return response

    async def _managed(self, call: Any) -> dict[str, Any]:
        import aiohttp

        try:
            return await call  # type: ignore[no-any-return]
        except aiohttp.ClientResponseError as exc:  # gcloud-aio puts the body in the message
            raise _error(exc.status, exc.message) from None
        except TimeoutError:
            raise self._no_answer() from None

    def _no_answer(self) -> TimeoutError:
        """A timeout, which says nothing by itself (``TimeoutError()``), naming who did not answer."""
        return TimeoutError(f"BigQuery ({self._root}) did not answer within {TIMEOUT:g}s")

    # datasets and tables

    async def get_dataset(self, dataset: str) -> dict[str, Any]:
        from gcloud.aio.bigquery import Dataset

        return await self._managed(Dataset(dataset, **self._common()).get(timeout=TIMEOUT))

    async def create_dataset(self, dataset: str) -> None:
        body: dict[str, Any] = {"datasetReference": {"projectId": self.project, "datasetId": dataset}}
        if self.location:
            body["location"] = self.location
        from gcloud.aio.bigquery import Dataset

        await self._managed(Dataset(dataset, **self._common()).insert(body, timeout=TIMEOUT))

    async def create_table(self, dataset: str, table: str, resource: dict[str, Any]) -> None:
        await self._managed(self._table(dataset, table).create(resource, timeout=TIMEOUT))

    async def add_columns(self, dataset: str, table: str, fields: list[dict[str, Any]]) -> None:
        """Add nullable columns: the table's schema patched (what insertAll and load jobs check),
        then the same as DDL, which changes nothing where the patch did (BigQuery itself) and adds
        them to the storage of emulators that apply only one of the two."""
        found = await self.get_table(dataset, table)
        known = {f["name"] for f in found["schema"]["fields"]}
        schema = {"fields": found["schema"]["fields"] + [f for f in fields if f["name"] not in known]}
        await self._managed(self._table(dataset, table).patch({"schema": schema}, timeout=TIMEOUT))
        for field in fields:
            kind = {"INTEGER": "INT64", "FLOAT": "FLOAT64"}.get(field["type"], field["type"])
            await self.query(f"ALTER TABLE `{dataset}.{table}` ADD COLUMN IF NOT EXISTS {field['name']} {kind}")

    async def get_table(self, dataset: str, table: str) -> dict[str, Any]:
        return await self._managed(self._table(dataset, table).get(timeout=TIMEOUT))

    def _table(self, dataset: str, table: str) -> Table:
        from gcloud.aio.bigquery import Table

        return Table(dataset, table, **self._common())

    async def insert_all(self, dataset: str, table: str, body: bytes) -> dict[str, Any]:
        """``tabledata.insertAll`` with a ready-made JSON body; its answer decoded by msgspec
        (aiohttp's ``json()`` checks the content type and looks for a charset first)."""
        url = f"{self._root}/projects/{self.project}/datasets/{dataset}/tables/{table}/insertAll"
        response = await self._call("POST", url, data=body, headers={"Content-Type": "application/json"})
        return msgspec.json.decode(await response.read())  # type: ignore[no-any-return]

    # jobs

    def _job(self, job_id: str | None = None) -> Job:
        from gcloud.aio.bigquery import Job

        return Job(job_id, location=self.location, **self._common())

    async def get_job(self, job_id: str) -> dict[str, Any] | None:
        """The job, or None if there is no job with that id."""
        try:
            return await self._managed(self._job(job_id).get_job(timeout=TIMEOUT))
        except BigQueryError as exc:
            if exc.status == 404:
                return None
            raise

    async def insert_job(self, job: dict[str, Any]) -> dict[str, Any]:
        return await self._managed(self._job().insert(job, timeout=TIMEOUT))

    async def upload_job(self, job: dict[str, Any], data: IO[bytes]) -> dict[str, Any]:
        """Start a load job with its data: a resumable upload, sent in one piece."""
        url = f"{self._upload_root}/projects/{self.project}/jobs"
        start = await self._call(
            "POST", url, params={"uploadType": "resumable"}, data=json.dumps(job),
            headers={"Content-Type": "application/json; charset=UTF-8"},
        )  # fmt: skip
        start.release()
        size = os.fstat(data.fileno()).st_size
        headers = {
            "Content-Type": "application/octet-stream",
            "Content-Length": str(size),
            "Content-Range": f"bytes 0-{size - 1}/{size}",  # the whole file, in one piece
        }
        response = await self._call("PUT", start.headers["Location"], data=data, headers=headers)
        return await response.json()  # type: ignore[no-any-return]

    async def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """Run a standard-SQL query and return all its rows as dicts of strings (timestamps as
        microseconds), waiting for the job and reading every page. ``parameters`` are named
        (``@name`` in ``sql``): strings, integers, or lists of strings."""
        return [row async for rows in self.query_pages(sql, parameters) for row in rows]

    async def query_pages(
        self, sql: str, parameters: dict[str, Any] | None = None, max_rows: int | None = None
    ) -> AsyncIterator[list[dict[str, Any]]]:
        """``query``'s rows a page at a time, as the API gives them (10 MB at most, and at most
        ``max_rows``): a large result is never held whole."""
        body: dict[str, Any] = {
            "query": sql, "useLegacySql": False, "timeoutMs": TIMEOUT * 1000,
            "formatOptions": {"useInt64Timestamp": True},
        }  # fmt: skip
        if max_rows is not None:
            body["maxResults"] = max_rows
        if parameters:
            body["parameterMode"] = "NAMED"
            body["queryParameters"] = [_parameter(name, value) for name, value in parameters.items()]
        result = await self._managed(self._job().query(body, timeout=TIMEOUT))
        yield self._rows(result)
        while not result.get("jobComplete", True) or result.get("pageToken"):
            job = self._job(result["jobReference"]["jobId"])
            params = {"timeoutMs": TIMEOUT * 1000, "formatOptions.useInt64Timestamp": "true"}
            if max_rows is not None:
                params["maxResults"] = str(max_rows)
            if result.get("pageToken"):
                params["pageToken"] = result["pageToken"]
            result = await self._managed(job.get_query_results(timeout=TIMEOUT, params=params))
            yield self._rows(result)

    @staticmethod
    def _rows(result: dict[str, Any]) -> list[dict[str, Any]]:
        if result.get("errors"):
            raise BigQueryError(400, "invalidQuery", str(result["errors"]))
        names = [field["name"] for field in result.get("schema", {}).get("fields", [])]
        return [dict(zip(names, (cell["v"] for cell in row["f"]), strict=True)) for row in result.get("rows", [])]


def _parameter(name: str, value: Any) -> dict[str, Any]:
    """A named query parameter: STRING, INT64, or ARRAY<STRING> for a list."""
    if isinstance(value, list):
        array = {"arrayValues": [{"value": str(v)} for v in value]}
        return {
            "name": name,
            "parameterType": {"type": "ARRAY", "arrayType": {"type": "STRING"}},
            "parameterValue": array,
        }
    kind = "INT64" if isinstance(value, int) else "STRING"
    return {"name": name, "parameterType": {"type": kind}, "parameterValue": {"value": str(value)}}
