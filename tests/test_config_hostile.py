"""Broken pipelines, as a careless operator or an attacker writes them: every one is refused with
the file, the line (or the resource) and what to do, never a traceback, a hang or silent acceptance.

``validate`` and ``run`` must agree: everything a pipeline can get wrong before it starts is a
validation error (exit 2); only resources that fail at run time (a port in use, an unwritable
path) exit 1.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from clickflow.cli import cli
from clickflow.plugins import Registry
from tests.emulators import CLICKFLOW

OK_SOURCE = "sources: [{type: simulator, count: 1}]\n"
OK_SINK = "sinks: [{type: duckdb, path: ':memory:'}]\n"
PUSH = "sources: [{type: pubsub_push, auth: none}]\n"
MONITOR = "monitor: {port: 0}\n"
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)

# (name, pipeline bytes, expected exit code, text the one error line must hold)
# fmt: off
BROKEN: list[tuple[str, bytes | str, int, str]] = [
    ("unclosed bracket", "sources: [{type: simulator\n" + OK_SINK, 2, ":2: invalid YAML"),
    ("tab indentation", "sources:\n\t- type: simulator\n" + OK_SINK, 2, ":2: invalid YAML"),
    ("duplicate key", "sources: [{type: simulator, count: 1, count: 2}]\n" + OK_SINK, 2, "count is given twice"),
    ("duplicate section", OK_SOURCE + OK_SINK + OK_SINK, 2, ":3: sinks is given twice (first on line 2)"),
    ("latin-1 file", (OK_SOURCE + "sinks: [{type: duckdb, path: 'caf\xe9'}]\n").encode("latin-1"), 2, ":2: not UTF-8"),
    ("utf-16 file", (OK_SOURCE + OK_SINK).encode("utf-16"), 2, ":1: not UTF-8 text (byte 0)"),
    ("control character", OK_SOURCE + "sinks: [{type: duckdb, path: 'a\x01b'}]\n", 2, ":2: invalid YAML"),
    ("unhashable key", "? [a, b]\n: 1\n", 2, ":1: a key must be plain text"),
    ("number as key", OK_SOURCE + OK_SINK + "runtime: {1: 2}\n", 2, ":3: a key must be plain text"),
    ("recursive alias", "sources: &a [*a]\n" + OK_SINK, 2, "an alias refers to the value that contains it"),
    ("nested 5,000 deep", "a: " + "[" * 5000 + "]" * 5000 + "\n", 2, "nested too deeply"),
    ("billion laughs", BOMB, 2, "expands to more than 10000 values"),
    ("python tag", "sources: !!python/object:os.system [ls]\n" + OK_SINK, 2, ":1: invalid YAML"),
    ("empty file", "", 2, "a pipeline is a mapping"),
    ("a list at the top", "- sources\n", 2, "a pipeline is a mapping"),
    ("no sinks", OK_SOURCE, 2, "sinks: required: a list of at least one sink"),
    ("no sources", "sources: []\n" + OK_SINK, 2, ":1: sources: needs at least one source"),
    ("unknown section", OK_SOURCE + OK_SINK + "monitoring: {}\n", 2, ":3: monitoring: unknown section"),
    ("source not a mapping", "sources: [simulator]\n" + OK_SINK, 2, "each source must be a mapping"),
    ("missing type", "sources: [{count: 1}]\n" + OK_SINK, 2, "source needs a 'type'"),
    ("unknown source", "sources: [{type: kafka}]\n" + OK_SINK, 2, "unknown source type 'kafka'; known source"),
    ("unknown sink", OK_SOURCE + "sinks: [{type: postgres}]\n", 2, "unknown sink type 'postgres'; known sink"),
    ("unknown option", "sources: [{type: simulator, cuont: 1}]\n" + OK_SINK, 2, "sources[0].cuont: unknown option"),
    ("wrong type", "sources: [{type: simulator, count: lots}]\n" + OK_SINK, 2, "count: expected int, got str"),
    ("zero count", "sources: [{type: simulator, count: 0}]\n" + OK_SINK, 2, "count: expected int >= 1"),
    ("negative rows", OK_SOURCE + "sinks: [{type: duckdb, batch: {max_rows: -1}}]\n", 2, "batch.max_rows"),
    ("negative bytes", OK_SOURCE + "sinks: [{type: duckdb, batch: {max_bytes: -5MB}}]\n", 2, "batch.max_bytes"),
    ("batch not a mapping", OK_SOURCE + "sinks: [{type: duckdb, batch: big}]\n", 2, "sinks[0].batch"),
    ("no retry attempts", OK_SOURCE + "sinks: [{type: duckdb, retry: {attempts: 0}}]\n", 2, "retry.attempts"),
    ("negative duration", OK_SOURCE + OK_SINK + "runtime: {shutdown_timeout: -1s}\n", 2, "cannot be negative"),
    ("not a duration", OK_SOURCE + OK_SINK + "runtime: {shutdown_timeout: soon}\n", 2, "'soon' is not a duration"),
    ("infinite timeout", OK_SOURCE + OK_SINK + "runtime: {shutdown_timeout: inf}\n", 2, "longer than a year"),
    ("YAML infinity", OK_SOURCE + OK_SINK + "runtime: {shutdown_timeout: .inf}\n", 2, "longer than a year"),
    ("1e20 seconds", OK_SOURCE + OK_SINK + "runtime: {shutdown_timeout: 1e20s}\n", 2, "longer than a year"),
    ("boolean duration", OK_SOURCE + OK_SINK + "runtime: {shutdown_timeout: true}\n", 2, "is not a duration"),
    ("port not a number", OK_SOURCE + OK_SINK + "monitor: {port: http}\n", 2, ":3: monitor.port"),
    ("port out of range", OK_SOURCE + OK_SINK + "monitor: {port: 70000}\n", 2, ":3: monitor.port"),
    ("missing variable", OK_SOURCE + "sinks: [{type: duckdb, path: '${NO_SUCH_VAR}'}]\n", 2, "NO_SUCH_VAR is not set"),
    ("name used twice", "sources: [{type: simulator, name: a}, {type: file, name: a, path: x}]\n" + OK_SINK, 2,
     "name 'a' is used twice"),
    ("two sinks on one file", OK_SOURCE + "sinks: [{type: duckdb, path: x.db}, {type: duckdb, path: ./x.db}]\n", 2,
     "sinks[1]: DuckDB database"),
    ("huge message limit", OK_SOURCE + OK_SINK + "runtime: {max_message_bytes: 1GB}\n", 2, "max_message_bytes"),
    ("push without monitor", PUSH + OK_SINK, 2, "serves /pubsub/push: add a monitor: section"),
    ("push without auth", "sources: [{type: pubsub_push}]\n" + OK_SINK + MONITOR, 2, "authenticated by default"),
    ("push with empty audience", "sources: [{type: pubsub_push, audience: '${AUD:-}'}]\n" + OK_SINK + MONITOR, 2,
     "authenticated by default"),
    ("push emails without audience", "sources: [{type: pubsub_push, allowed_emails: [a@b.c]}]\n" + OK_SINK + MONITOR,
     2, "authenticated by default"),
    ("push emails with auth none", "sources: [{type: pubsub_push, auth: none, allowed_emails: [a@b.c]}]\n" + OK_SINK
     + MONITOR, 2, "auth: none verifies no token"),
    ("push empty sender", "sources: [{type: pubsub_push, audience: x, allowed_emails: ['${W:-}']}]\n" + OK_SINK
     + MONITOR, 2, "allowed_emails has an empty entry"),
    ("push on /metrics", "sources: [{type: pubsub_push, auth: none, path: /metrics}]\n" + OK_SINK + MONITOR, 2,
     "HTTP path /metrics is already used by the monitoring server"),
    ("two pushes on one path", "sources: [{type: pubsub_push, auth: none}, {type: pubsub_push, auth: none}]\n"
     + OK_SINK + MONITOR, 2, "sources[1]: HTTP path /pubsub/push is already used by source 'pubsub_push'"),
    ("push body limit too big", "sources: [{type: pubsub_push, auth: none, max_body_bytes: 1GB}]\n" + OK_SINK
     + MONITOR, 2, "max_body_bytes"),
    ("push pending below a body", "sources: [{type: pubsub_push, auth: none, max_pending_bytes: 1MiB}]\n" + OK_SINK
     + MONITOR, 2, "max_pending_bytes (1048576) is below max_body_bytes"),
    ("push waiting past Pub/Sub", "sources: [{type: pubsub_push, auth: none, ack_timeout: 11m}]\n" + OK_SINK
     + MONITOR, 2, "ack_timeout is above 600s, the longest Pub/Sub waits"),
    ("push into load jobs", PUSH + "sinks: [{type: bigquery_load, project: p, dataset: d}]\n" + MONITOR, 2,
     "p.yaml:2: sinks[0]: sink 'bigquery_load' keeps 86.4s between writes under steady load, no less than "
     "source 'pubsub_push' waits for its messages to be stored (60s)"),
    ("bigquery project not an id", OK_SOURCE + "sinks: [{type: bigquery_streaming, project: My Project, dataset: d}]\n",
     2, "sinks[0]: project: 'My Project' is not a Google Cloud project id"),
    ("bigquery project a path", OK_SOURCE + "sinks: [{type: bigquery_load, project: 'p/datasets/x', dataset: d}]\n",
     2, "sinks[0]: project: 'p/datasets/x' is not a Google Cloud project id"),
    ("file with no path", "sources: [{type: file, path: []}]\n" + OK_SINK, 2, "path names nothing to read"),
    ("file path unset", "sources: [{type: file, path: '${IN:-}'}]\n" + OK_SINK, 2,
     "path has an empty entry (an unset variable?)"),
    ("file in no bucket", "sources: [{type: file, path: [a.json, 'gs:///x.json']}]\n" + OK_SINK, 2,
     "path 'gs:///x.json' is not gs://BUCKET/NAME"),
    ("file a whole bucket", "sources: [{type: file, path: 'gs://logs'}]\n" + OK_SINK, 2,
     "path 'gs://logs' is not gs://BUCKET/NAME"),
    ("duckdb path unset", OK_SOURCE + "sinks: [{type: duckdb, path: '${OUT:-}'}]\n", 2,
     "sinks[0]: path is empty (an unset variable?); write :memory: for a database that is not kept"),
    ("duckdb memory not a size", OK_SOURCE + "sinks: [{type: duckdb, memory_limit: lots}]\n", 2,
     "sinks[0]: memory_limit or settings: DuckDB refuses them: Parser Error: Memory must have a number (e.g. 1GB)"),
    ("duckdb setting unknown", OK_SOURCE + "sinks: [{type: duckdb, settings: {max_vacum_tasks: 0}}]\n", 2,
     "sinks[0]: memory_limit or settings: DuckDB refuses them: Invalid Input Error: The following options were not "
     "recognized: max_vacum_tasks"),
    ("pull in a tight loop", "sources: [{type: pubsub_pull, subscription: projects/p/subscriptions/s, "
     "pull_timeout: 0s}]\n" + OK_SINK, 2, "pull_timeout must be at least 1s"),
    ("acknowledging in a tight loop", "sources: [{type: pubsub_pull, subscription: projects/p/subscriptions/s, "
     "ack_interval: 0s}]\n" + OK_SINK, 2, "ack_interval must be at least 0.001s"),
    ("push refusing everything", "sources: [{type: pubsub_push, auth: none, read_timeout: 0s}]\n" + OK_SINK
     + MONITOR, 2, "read_timeout must be at least 0.001s"),
    ("idle connections held for ever", OK_SOURCE + OK_SINK + "monitor: {idle_timeout: 0s}\n", 2,
     "monitor: idle_timeout must be at least 0.001s"),
    ("healthz always failing", OK_SOURCE + OK_SINK + "runtime: {heartbeat_max_age: 0s}\n", 2,
     "runtime: heartbeat_max_age must be at least 1s"),
    ("healthz failing on a quiet pull", "sources: [{type: pubsub_pull, subscription: projects/p/subscriptions/s, "
     "pull_timeout: 90s}]\n" + OK_SINK, 2, "p.yaml:1: sources[0]: source 'pubsub_pull' may report only every 90s "
     "while it waits, no sooner than runtime.heartbeat_max_age (60s): /healthz would fail whenever traffic pauses"),
    ("healthz failing on a slow simulator", "sources: [{type: simulator, visits_per_minute: 0.5}]\n" + OK_SINK
     + "runtime: {heartbeat_max_age: 2m}\n", 2, "source 'simulator' may report only every 120s while it waits"),
    ("bad subscription", "sources: [{type: pubsub_pull, subscription: my-sub}]\n" + OK_SINK, 2, "subscription"),
]
# fmt: on


@pytest.fixture
def invoke(clickflow_registry: Registry, tmp_path: Path) -> Iterator[object]:
    """Run a clickflow command in this process, returning (exit code, stderr, the exception if any)."""
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str, BaseException | None]:
        result = runner.invoke(cli, list(args), obj=clickflow_registry, catch_exceptions=True)
        unexpected = None if isinstance(result.exception, SystemExit | None) else result.exception
        return result.exit_code, result.stderr, unexpected

    yield run


def test_there_are_at_least_forty_cases() -> None:
    assert len(BROKEN) >= 40
    assert len({name for name, *_ in BROKEN}) == len(BROKEN)


@pytest.mark.timeout(20)
@pytest.mark.parametrize(("name", "text", "code", "expected"), BROKEN, ids=[case[0] for case in BROKEN])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_broken_pipeline_is_refused_clearly(
    invoke: object, tmp_path: Path, command: str, name: str, text: bytes | str, code: int, expected: str
) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    exit_code, stderr, unexpected = invoke(command, str(path))  # type: ignore[operator]
    assert unexpected is None, f"{name}: {unexpected!r}"
    assert exit_code == code, stderr
    assert "Traceback" not in stderr
    assert stderr.startswith(str(path)), stderr
    assert expected in stderr, stderr


def test_a_missing_pipeline_file_is_named(invoke: object, tmp_path: Path) -> None:
    exit_code, stderr, unexpected = invoke("validate", str(tmp_path / "nope.yaml"))  # type: ignore[operator]
    assert (exit_code, unexpected) == (2, None)
    assert f"{tmp_path / 'nope.yaml'}: cannot read pipeline: No such file or directory" in stderr


def test_a_directory_given_as_a_pipeline_is_refused(invoke: object, tmp_path: Path) -> None:
    exit_code, stderr, unexpected = invoke("run", str(tmp_path))  # type: ignore[operator]
    assert (exit_code, unexpected) == (2, None)
    assert "is a directory" in stderr


@pytest.mark.parametrize(
    ("sink", "expected"),
    [
        ("{type: duckdb, path: /proc/clickflow.duckdb}", "sink 'duckdb' could not start"),
        ("{type: duckdb, path: '{tmp}/no/such/dir/x.duckdb'}", "sink 'duckdb' could not start"),
    ],
)
def test_an_unusable_database_path_fails_the_run_with_one_line(
    invoke: object, tmp_path: Path, sink: str, expected: str
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(OK_SOURCE + f"sinks: [{sink.replace('{tmp}', str(tmp_path))}]\n")
    exit_code, stderr, unexpected = invoke("run", "--no-progress", str(path))  # type: ignore[operator]
    assert (exit_code, unexpected) == (1, None), stderr
    assert stderr.startswith(f"clickflow: {expected}") and "Traceback" not in stderr


def test_a_file_source_pointing_at_a_directory_fails_the_run_with_one_line(invoke: object, tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(f"sources: [{{type: file, path: '{tmp_path}'}}]\n" + OK_SINK)
    exit_code, stderr, unexpected = invoke("run", "--no-progress", str(path))  # type: ignore[operator]
    assert (exit_code, unexpected) == (1, None), stderr
    assert f"'{tmp_path}' is a directory, not a file: name its files" in stderr and "Traceback" not in stderr


def test_a_file_source_reading_a_pipe_says_why_it_cannot(tmp_path: Path) -> None:
    """``clickflow simulate | clickflow run`` on /dev/stdin: refused, saying what it is (it read
    "does not exist or is not a file", though it exists) and what reads standard input."""
    path = tmp_path / "p.yaml"
    path.write_text("sources: [{type: file, path: /dev/stdin}]\n" + OK_SINK)
    run = subprocess.run([*CLICKFLOW, "run", "--no-progress", str(path)], input=b'{"session_id": "s"}\n',
                         capture_output=True, timeout=60)  # fmt: skip
    assert run.returncode == 1, run.stderr
    assert b"'/dev/stdin' is not a regular file: the file source reads files, and standard input as '-'" in run.stderr
    assert b"Traceback" not in run.stderr


def test_a_monitor_port_in_use_fails_the_run_with_one_line(invoke: object, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "p.yaml"
        path.write_text(OK_SOURCE + OK_SINK + f"monitor: {{port: {port}}}\n")
        exit_code, stderr, unexpected = invoke("run", "--no-progress", str(path))  # type: ignore[operator]
    assert (exit_code, unexpected) == (1, None), stderr
    assert stderr == f"clickflow: monitor: cannot listen on 127.0.0.1:{port}: Address already in use\n"


@pytest.mark.parametrize(
    ("host", "why"),
    [("no-such-host.invalid", ""), ("203.0.113.9", "Cannot assign requested address")],  # DNS's words vary
)
def test_a_monitor_host_the_run_cannot_listen_on_is_named_in_one_line(
    invoke: object, tmp_path: Path, host: str, why: str
) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(OK_SOURCE + OK_SINK + f"monitor: {{host: {host}, port: 0}}\n")
    exit_code, stderr, unexpected = invoke("run", "--no-progress", str(path))  # type: ignore[operator]
    assert (exit_code, unexpected) == (1, None), stderr
    assert stderr.startswith(f"clickflow: monitor: cannot listen on {host}:0: {why}") and stderr.count("\n") == 1
