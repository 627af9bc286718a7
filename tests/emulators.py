"""Real emulators for integration tests, started and stopped by the tests themselves.

A missing emulator skips its tests with install instructions, except when
CLICKFLOW_REQUIRE_EMULATORS is set (CI sets it): then it is a failure.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from clickflow.api import Message
from clickflow.parser import VisitParser
from clickflow_simulator import VisitGenerator

REPO = Path(__file__).resolve().parent.parent
PUBSUB_LAUNCHERS = (
    "cloud-pubsub-emulator",
    "/usr/lib/google-cloud-sdk/platform/pubsub-emulator/bin/cloud-pubsub-emulator",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing(what: str, how: str) -> None:
    message = f"{what} is not installed; {how}"
    if os.environ.get("CLICKFLOW_REQUIRE_EMULATORS"):
        pytest.fail(message)
    pytest.skip(message)


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"emulator exited early:\n{log.read_text()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError(f"emulator did not listen on {port} within {seconds}s:\n{log.read_text()[-2000:]}")


class PubSubEmulator:
    """A running emulator and the few REST calls tests need (create, publish, count)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.project = "clickflow-test"

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        request = urllib.request.Request(
            f"http://{self.host}/v1/{path}", method=method, data=json.dumps(body or {}).encode(),
            headers={"Content-Type": "application/json"},
        )  # fmt: skip
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read() or b"{}")  # type: ignore[no-any-return]

    def topic(self, name: str) -> str:
        path = f"projects/{self.project}/topics/{name}"
        self._call("PUT", path)
        return path

    def subscription(self, name: str, topic: str, ack_deadline: int = 10, push_endpoint: str | None = None) -> str:
        path = f"projects/{self.project}/subscriptions/{name}"
        body: dict[str, Any] = {"topic": topic, "ackDeadlineSeconds": ack_deadline}
        if push_endpoint:
            body["pushConfig"] = {"pushEndpoint": push_endpoint}
        self._call("PUT", path, body)
        return path

    def publish(self, topic: str, payloads: list[bytes]) -> list[str]:
        ids: list[str] = []
        for start in range(0, len(payloads), 1000):
            chunk = payloads[start : start + 1000]
            messages = [{"data": base64.b64encode(p).decode()} for p in chunk]
            ids += self._call("POST", f"{topic}:publish", {"messages": messages})["messageIds"]
        return ids

    def published_visits(self, name: str, count: int, seed: int) -> tuple[str, dict[str, int]]:
        """A new topic and subscription ``name`` with ``count`` simulated visits published:
        the subscription, and the rows the visits must give."""
        topic = self.topic(name)
        subscription = self.subscription(name, topic)
        payloads = simulated_visits(count, seed)
        return subscription, expected_counts(payloads, self.publish(topic, payloads))

    def pull(self, subscription: str, max_messages: int = 1000) -> list[dict[str, Any]]:
        """Messages currently deliverable (not acknowledged), left unacknowledged."""
        body = {"maxMessages": max_messages, "returnImmediately": True}
        return self._call("POST", f"{subscription}:pull", body).get("receivedMessages", [])  # type: ignore[no-any-return]


def simulated_visits(count: int, seed: int) -> list[bytes]:
    """Simulated visits with about 10% broken messages or events."""
    return list(VisitGenerator(seed=seed, malformed_rate=0.1).messages(count))


def expected_counts(payloads: list[bytes], message_ids: list[str]) -> dict[str, int]:
    """The rows these messages give, parsed directly."""
    messages = [Message(p, i) for p, i in zip(payloads, message_ids, strict=True)]
    return VisitParser().parse(messages, "expected", 0).counts()


def pubsub_launcher() -> str | None:
    """The emulator's launcher, or None when it (or Java) is not installed."""
    launcher = next((p for p in PUBSUB_LAUNCHERS if shutil.which(p) or os.path.exists(p)), None)
    return launcher if launcher and shutil.which("java") else None


@contextmanager
def listening(command: list[str], port: int, log: Path, env: dict[str, str] | None = None) -> Iterator[None]:
    """Run a server (output to ``log``) until the block ends; enter the block once it listens on ``port``."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, start_new_session=True
        )
    try:
        wait_for_port(port, process, log)
        yield
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


@contextmanager
def running_pubsub_emulator(launcher: str, log: Path) -> Iterator[PubSubEmulator]:
    """Start the emulator on a free port, yield it once it listens, stop it afterwards."""
    port = free_port()
    with listening([launcher, "--host=127.0.0.1", f"--port={port}"], port, log):
        yield PubSubEmulator(f"127.0.0.1:{port}")


@pytest.fixture(scope="session")
def pubsub_emulator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PubSubEmulator]:
    launcher = pubsub_launcher()
    if launcher is None:
        missing("the Pub/Sub emulator", "apt-get install google-cloud-cli-pubsub-emulator (needs Java)")
    with running_pubsub_emulator(str(launcher), tmp_path_factory.mktemp("pubsub") / "emulator.log") as emulator:
        yield emulator


# A clickflow process under test, watched through its /metrics.


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return sum(float(v) for v in re.findall(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


CLICKFLOW = [sys.executable, "-m", "clickflow"]


def clickflow(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run a ``clickflow`` command to its end, from the repository, with extra environment."""
    environ = {**os.environ, **(env or {})}
    return subprocess.run([*CLICKFLOW, *args], capture_output=True, text=True, timeout=300, cwd=REPO, env=environ)


def start_clickflow(pipeline: str | Path, host: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """``clickflow run PIPELINE`` against the Pub/Sub emulator at ``host``, in the background."""
    environ = {**os.environ, "PUBSUB_EMULATOR_HOST": host, **(env or {})}
    return subprocess.Popen([*CLICKFLOW, "run", str(pipeline)], cwd=REPO, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def ready(port: int) -> bool:
    """Whether a clickflow process (or any server) on ``port`` answers ``/readyz`` with 200."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def wait_until_quiet(ports: list[int], quiet: float, seconds: float = 180) -> None:
    """Wait until the clickflow processes on ``ports`` received no new message for ``quiet`` seconds
    (longer than the subscription's ack deadline: a dead worker's messages have been redelivered)."""
    deadline = time.monotonic() + seconds
    last, quiet_since = -1.0, time.monotonic()
    while time.monotonic() - quiet_since < quiet:
        assert time.monotonic() < deadline, "the workers never went quiet"
        received = sum(metric(port, "clickflow_messages_received_total") for port in ports)
        if received != last:
            last, quiet_since = received, time.monotonic()
        time.sleep(0.5)


def wait_for(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")
