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

    def pull(self, subscription: str, max_messages: int = 1000) -> list[dict[str, Any]]:
        """Messages currently deliverable (not acknowledged), left unacknowledged."""
        body = {"maxMessages": max_messages, "returnImmediately": True}
        return self._call("POST", f"{subscription}:pull", body).get("receivedMessages", [])  # type: ignore[no-any-return]


def pubsub_launcher() -> str | None:
    """The emulator's launcher, or None when it (or Java) is not installed."""
    launcher = next((p for p in PUBSUB_LAUNCHERS if shutil.which(p) or os.path.exists(p)), None)
    return launcher if launcher and shutil.which("java") else None


@contextmanager
def running_pubsub_emulator(launcher: str, log: Path) -> Iterator[PubSubEmulator]:
    """Start the emulator on a free port, yield it once it listens, stop it afterwards."""
    port = free_port()
    with open(log, "wb") as out:
        process = subprocess.Popen(
            [launcher, "--host=127.0.0.1", f"--port={port}"], stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
    try:
        wait_for_port(port, process, log)
        yield PubSubEmulator(f"127.0.0.1:{port}")
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


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


def start_clickflow(pipeline: Path, host: str) -> subprocess.Popen[str]:
    """``clickflow run PIPELINE`` against the Pub/Sub emulator at ``host``."""
    env = {**os.environ, "PUBSUB_EMULATOR_HOST": host}
    command = [sys.executable, "-m", "clickflow", "run", str(pipeline)]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


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
