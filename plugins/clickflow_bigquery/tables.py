"""The four tables in BigQuery: resources built from ``clickflow.schema``, created or checked.

Each table is day-partitioned on its main timestamp and clustered for the
dashboard queries in ``sql/``: ``events`` by event type and page,
``purchase_items`` by category and product, ``visits`` by device type and
``dead_letter`` by reason.
"""

from __future__ import annotations

import logging
from typing import Any

from clickflow.schema import TABLES, Table
from clickflow_bigquery.client import BigQueryClient, BigQueryError

log = logging.getLogger(__name__)

BIGQUERY_TYPES = {"STRING": "STRING", "INT64": "INTEGER", "FLOAT64": "FLOAT", "TIMESTAMP": "TIMESTAMP"}
_SAME_TYPE = {"INT64": "INTEGER", "FLOAT64": "FLOAT", "BOOL": "BOOLEAN"}


class SchemaMismatch(Exception):
    """An existing table's columns differ from clickflow's schema."""


def table_resource(table: Table) -> dict[str, Any]:
    fields = [
        {
            "name": c.name,
            "type": BIGQUERY_TYPES[c.type],
            "mode": "REQUIRED" if c.required else "NULLABLE",
            **({"description": c.description} if c.description else {}),
        }
        for c in table.columns
    ]
    resource: dict[str, Any] = {
        "description": table.description,
        "schema": {"fields": fields},
        "timePartitioning": {"type": "DAY", "field": table.partition_by},
    }
    if table.cluster_by:
        resource["clustering"] = {"fields": list(table.cluster_by)}
    return resource


def missing_nullable_columns(table: Table, found: dict[str, Any]) -> list[str]:
    """Columns clickflow added to ``table`` since ``found`` was made: nullable, so they can be added."""
    actual = {f["name"] for f in found.get("schema", {}).get("fields", [])}
    return [c.name for c in table.columns if c.name not in actual and not c.required]


def schema_differences(table: Table, found: dict[str, Any], apart: frozenset[str] = frozenset()) -> list[str]:
    """What keeps clickflow from writing ``table`` into the existing table ``found``, but for its
    missing columns ``apart`` (nullable ones, added or reported by the caller)."""
    expected = {f["name"]: f for f in table_resource(table)["schema"]["fields"]}
    actual = {f["name"]: f for f in found.get("schema", {}).get("fields", [])}
    problems = [f"column {name} is missing" for name in expected if name not in actual and name not in apart]
    for name, field in actual.items():
        want = expected.get(name)
        if want is None:
            if field.get("mode") == "REQUIRED":
                problems.append(f"column {name} is REQUIRED but clickflow does not write it")
            continue
        have_type = _SAME_TYPE.get(field["type"], field["type"])
        if have_type != want["type"]:
            problems.append(f"column {name} is {field['type']}, clickflow writes {want['type']}")
        if field.get("mode") == "REPEATED" or (field.get("mode") == "REQUIRED" and want["mode"] != "REQUIRED"):
            problems.append(f"column {name} is {field.get('mode')}, clickflow writes {want['mode']}")
    return problems


async def ensure_dataset(client: BigQueryClient, dataset: str) -> None:
    """Create ``dataset`` if it does not exist. It is looked up first, so a service account granted
    roles on the dataset alone (no project-wide ``bigquery.datasets.create``) can start."""
    try:
        await client.get_dataset(dataset)
        return
    except BigQueryError as exc:
        if exc.status != 404:
            raise
    try:
        await client.create_dataset(dataset)
        log.info("created dataset %s.%s", client.project, dataset)
    except BigQueryError as exc:
        if exc.status != 409:  # created meanwhile by another worker
            raise


async def ensure_tables(client: BigQueryClient, dataset: str, names: dict[str, str], *, create: bool) -> list[str]:
    """Check the tables (``names`` maps clickflow's names to BigQuery's), creating what is missing
    if ``create``. Returns the tables created; raises SchemaMismatch listing every difference."""
    if create:
        await ensure_dataset(client, dataset)
    created, problems = [], []
    for name, table in TABLES.items():
        target = names[name]
        where = f"{client.project}.{dataset}.{target}"
        try:
            found = await client.get_table(dataset, target)
        except BigQueryError as exc:
            if exc.status != 404:
                raise
            if not create:
                problems.append(f"{where} does not exist (`clickflow bigquery create-tables` makes it)")
                continue
            try:
                await client.create_table(dataset, target, table_resource(table))
                created.append(where)
                log.info("created table %s", where)
            except BigQueryError as exc:
                if exc.status != 409:  # created meanwhile by another worker: checked next run
                    raise
            continue
        missing = missing_nullable_columns(table, found)
        if missing and create:  # schema evolution: columns clickflow has written since this table was made
            fields = [f for f in table_resource(table)["schema"]["fields"] if f["name"] in missing]
            await client.add_columns(dataset, target, fields)
            log.info("added column(s) %s to %s", ", ".join(missing), where)
        elif missing:
            problems.append(
                f"{where} lacks column(s) {', '.join(missing)} (`clickflow bigquery create-tables` adds them)"
            )
        problems += [f"{where}: {p}" for p in schema_differences(table, found, frozenset(missing))]
        partitioning = found.get("timePartitioning", {}).get("field")
        if partitioning != table.partition_by:
            log.warning("%s is partitioned by %s, not %s: queries scan more", where, partitioning, table.partition_by)
    if problems:
        raise SchemaMismatch("BigQuery tables do not match clickflow's schema:\n  " + "\n  ".join(problems))
    return created
