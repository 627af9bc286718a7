"""The monitoring server's connection cap: connections anyone can open never take the files a run needs."""

from __future__ import annotations

import asyncio
import resource
import selectors
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import duckdb
import pytest

from clickflow.config import MonitorOptions, Pipeline
from clickflow.monitor import serve
from clickflow.runtime import Runtime
from tests.emulators import CLICKFLOW, REPO, free_port, metric, ready, wait_for

BUSY = b"HTTP/1.1 503 Service Unavailable\r\n"


def _files(soft: int, hard: int | None = None) -> Callable[[], None]:
    """For ``preexec_fn``: the child's open-file limits (the hard one the soft one, if not given)."""
    return lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard or soft))


@contextmanager
def _held(port: int, count: int) -> Iterator[list[socket.socket]]:
    """``count`` connections to ``port`` that send nothing, closed at the end; opened 64 at a time,
    fewer than the listen queue holds (a connection it has no room for waits a second or more)."""
    with ExitStack() as stack:
        connections = []
        for _ in range(0, count, 64):
            connections += [stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=10))
                            for _ in range(min(64, count - len(connections)))]  # fmt: skip
            time.sleep(0.05)
        yield connections


def _healthz(port: int) -> int:
    """The status of ``/healthz`` (503: refused, past the cap)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return error.code


def _answered(connections: list[socket.socket], seconds: float) -> dict[bytes, int]:
    """What the server sent the connections it closed within ``seconds``, and how many got each;
    ``b""`` counts those still open."""
    got: dict[bytes, int] = {}
    with selectors.DefaultSelector() as waiting:  # epoll: more sockets than select() takes
        for connection in connections:
            waiting.register(connection, selectors.EVENT_READ)
        deadline = time.monotonic() + seconds
        while waiting.get_map() and (left := deadline - time.monotonic()) > 0:
            for key, _ in waiting.select(left):
                try:
                    answer = key.fileobj.recv(1024)  # type: ignore[union-attr]
                except ConnectionResetError:
                    answer = b"reset"
                got[answer[: len(BUSY)]] = got.get(answer[: len(BUSY)], 0) + 1
                waiting.unregister(key.fileobj)
        got[b""] = got.get(b"", 0) + len(waiting.get_map())
    return got


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_connections_past_the_open_file_limit_are_refused_and_the_run_stores_every_visit(
    tmp_path: Path, event_loop: str
) -> None:
    """Under `ulimit -n 1024`, 1,200 idle connections took every file the process had: DuckDB could
    not open a batch's spool ("Cannot open file ...: Too many open files") and the run failed."""
    port = free_port()
    visits = 3000
    pipeline = tmp_path / "held.yaml"
    pipeline.write_text(
        f"sources: [{{type: simulator, count: {visits}, visits_per_minute: 45000, batch_size: 50, seed: 3}}]\n"
        f"sinks: [{{type: duckdb, path: '{tmp_path}/held.duckdb', batch: {{max_age: 100ms}}}}]\n"
        f"monitor: {{port: {port}}}\nruntime: {{event_loop: {event_loop}}}\n"
    )
    run = subprocess.Popen([*CLICKFLOW, "run", "--no-progress", str(pipeline)], cwd=REPO, preexec_fn=_files(1024),
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_for(lambda: ready(port), 30)
        with _held(port, 1200) as connections:
            answered = _answered(connections, 5)  # longer than the sink's retries of a write (3 s)
        _, errors = run.communicate(timeout=60)
    finally:
        run.kill()
        run.wait()
    assert run.returncode == 0, errors
    assert answered == {BUSY: 1200 - 384, b"": 384}  # the cap is 1024 / 2 - 128, and those within it stay open
    assert "answered 503" in errors
    with duckdb.connect(str(tmp_path / "held.duckdb"), read_only=True) as con:
        stored = con.execute("SELECT (SELECT count(*) FROM visits) + (SELECT count(*) FROM dead_letter)").fetchone()
    assert stored == (visits,)


@pytest.mark.asyncio
@pytest.mark.event_loops
async def test_a_connection_past_max_connections_is_answered_503_and_counted(
    pipeline: Callable[..., Pipeline],
) -> None:
    runtime = Runtime(pipeline("sources: [{type: simulator, count: 1}]\nsinks: [{type: duckdb, path: ':memory:'}]\n"))
    async with serve(runtime, MonitorOptions(port=0, max_connections=3)) as url:
        host, port = url.removeprefix("http://").rsplit(":", 1)
        held = [await asyncio.open_connection(host, int(port)) for _ in range(3)]
        try:
            reader, writer = await asyncio.open_connection(host, int(port))
            held.append((reader, writer))
            assert (await asyncio.wait_for(reader.read(), 5)).startswith(BUSY)  # then closed: the read ends
            with pytest.raises(TimeoutError):  # the first three stay open
                await asyncio.wait_for(held[0][0].read(1), 0.3)
            held.pop(0)[1].close()  # one closed: once the server sees it, there is room for a request
            busy = 0
            while (status := await asyncio.to_thread(_healthz, int(port))) == 503:
                busy += 1
            assert status == 200 and busy < 50
            refused = await asyncio.to_thread(metric, int(port), "clickflow_monitor_connections_refused_total")
            assert refused == 1 + busy
            connections = await asyncio.to_thread(metric, int(port), "clickflow_monitor_connections")
            assert connections == 3  # two held, and the scrape's own
        finally:
            for _, writer in held:
                writer.close()


def test_the_soft_open_file_limit_is_raised_to_the_hard_one_and_half_of_it_is_the_default_cap() -> None:
    code = (
        "from clickflow.config import MonitorOptions\n"
        "from clickflow.monitor import connection_cap\n"
        "import resource\n"
        "print(connection_cap(MonitorOptions()), *resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    limits = _files(200, 500)
    shown = subprocess.run([sys.executable, "-c", code], preexec_fn=limits, capture_output=True, text=True, check=True)
    assert shown.stdout.split() == [str(500 // 2 - 128), "500", "500"]
