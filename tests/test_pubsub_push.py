"""The pubsub_push endpoint: envelopes, ack-after-sink answers, OIDC auth, and the emulator end to end."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from clickflow.api import Message
from clickflow.config import Pipeline
from clickflow.monitor import build_app
from clickflow.parser import VisitParser
from clickflow.runtime import Runtime
from clickflow_pubsub.push import MAX_ENVELOPE_BYTES, _message_from_any, message_from_body
from clickflow_simulator import VisitGenerator
from tests.conftest import REPO, table_counts
from tests.emulators import (
    CLICKFLOW,
    PubSubEmulator,
    clickflow,
    expected_counts,
    free_port,
    metric,
    start_clickflow,
    wait_for,
)
from tests.tokens import AUDIENCE, SENDER, key_set, token

pytestmark = pytest.mark.event_loops  # async tests on uvloop too, which serves the endpoint in a run


def envelope(data: bytes, message_id: str = "m-1") -> bytes:
    message = {"data": base64.b64encode(data).decode(), "messageId": message_id, "attributes": {}}
    return json.dumps({"message": message, "subscription": "projects/p/subscriptions/s"}).encode()


def test_envelopes_unwrapped_bodies_and_garbage_all_become_messages() -> None:
    assert message_from_body(envelope(b'{"session_id": "S"}', "42"), {}) == message_from_body(
        envelope(b'{"session_id": "S"}', "42"), {}
    )
    wrapped = message_from_body(envelope(b"payload", "42"), {})
    assert (wrapped.data, wrapped.message_id) == (b"payload", "42")
    unwrapped = message_from_body(b'{"session_id": "S"}', {"x-goog-pubsub-message-id": "43"})
    assert (unwrapped.data, unwrapped.message_id) == (b'{"session_id": "S"}', "43")
    garbage = message_from_body(b'{"message": {"data": "not base64!"}}', {})
    assert garbage.data == b'{"message": {"data": "not base64!"}}'
    assert garbage.message_id.startswith("push:")


_ids = st.one_of(st.none(), st.text(max_size=8), st.integers(), st.booleans(), st.just(""))
_data = st.one_of(
    st.binary(max_size=12).map(lambda raw: base64.b64encode(raw).decode()),  # valid base64
    st.text(alphabet="AZaz09+/=-_ \n", max_size=12),  # mostly not
    st.none(),
    st.integers(),
    st.lists(st.integers(), max_size=2),
)
_attributes = st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2)
_fields = {"data": _data, "messageId": _ids, "message_id": _ids, "attributes": _attributes}
_inner = st.fixed_dictionaries({}, optional=_fields)
_not_a_message = st.one_of(st.none(), st.text(max_size=4), st.integers())
_bodies = st.one_of(
    st.builds(lambda inner: json.dumps({"message": inner, "subscription": "s"}).encode(), _inner),
    st.builds(lambda other: json.dumps({"message": other}).encode(), _not_a_message),
    st.binary(max_size=40),
)


@settings(max_examples=500, deadline=None)
@given(body=_bodies, header_id=st.one_of(st.none(), st.text(min_size=1, max_size=6)))
def test_the_fast_envelope_decoder_reads_every_body_as_the_generic_one_does(body: bytes, header_id: str | None) -> None:
    headers = {} if header_id is None else {"x-goog-pubsub-message-id": header_id}
    assert message_from_body(body, headers) == _message_from_any(body, headers)


@pytest.fixture
def keys() -> dict[str, Any]:
    return {name: rsa.generate_private_key(public_exponent=65537, key_size=2048) for name in ("google", "forger")}


@pytest_asyncio.fixture
async def push_client(
    aiohttp_client: Any, aiohttp_server: Any, keys: dict[str, Any], pipeline: Callable[..., Pipeline], tmp_path: Path
) -> AsyncIterator[tuple[Any, Runtime]]:
    async def certs(_: web.Request) -> web.Response:
        return web.json_response(key_set(keys["google"]))

    jwks = web.Application()
    jwks.router.add_get("/certs", certs)
    keys_server = await aiohttp_server(jwks)
    runtime = Runtime(pipeline(
        f"sources: [{{type: pubsub_push, audience: '{AUDIENCE}', allowed_emails: ['{SENDER}'],"
        f" keys_url: '{keys_server.make_url('/certs')}'}}]\n"
        f"sinks: [{{type: duckdb, path: '{tmp_path}/push.duckdb', batch: {{max_age: 50ms}}}}]\n"
        "monitor: {port: 0}\n"
    ))  # fmt: skip
    client = await aiohttp_client(build_app(runtime))
    task = asyncio.create_task(runtime.run())
    while not runtime.heartbeats:  # noqa: ASYNC110 - the runtime exposes no "running" event
        await asyncio.sleep(0.01)
    yield client, runtime
    runtime.request_stop()
    await task


@pytest.mark.asyncio
async def test_a_valid_token_gets_the_message_stored_then_204(
    push_client: tuple[Any, Runtime], keys: dict[str, Any]
) -> None:
    client, runtime = push_client
    visit = next(VisitGenerator(seed=1).messages(1))
    response = await client.post("/pubsub/push", data=envelope(visit),
                                 headers={"Authorization": f"Bearer {token(keys['google'])}"})  # fmt: skip
    assert response.status == 204
    assert runtime.summary.acknowledged == 1 and runtime.summary.rows["visits"] == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("case", "status"),
    [("missing", 401), ("forged", 401), ("expired", 401), ("audience", 403), ("email", 403), ("unverified", 403)],
)
async def test_bad_tokens_are_refused_before_the_parser(
    push_client: tuple[Any, Runtime], keys: dict[str, Any], case: str, status: int
) -> None:
    client, runtime = push_client
    bearer = {
        "missing": None,
        "forged": token(keys["forger"]),
        "expired": token(keys["google"], exp=int(time.time()) - 60),
        "audience": token(keys["google"], aud="https://elsewhere.example.com"),
        "email": token(keys["google"], email="intruder@evil.example.com"),
        "unverified": token(keys["google"], email_verified=False),
    }[case]
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    response = await client.post("/pubsub/push", data=envelope(b"{}"), headers=headers)
    assert response.status == status
    assert sum(runtime.summary.messages.values()) == 0


@pytest.mark.asyncio
async def test_a_flood_of_refused_requests_is_counted_each_and_logged_once(
    push_client: tuple[Any, Runtime], caplog: pytest.LogCaptureFixture
) -> None:
    """Anyone who reaches the endpoint could fill the log with refusals, a line each: the metric
    counts every one, the log says it once a cause and interval, with how many it left out."""
    client, runtime = push_client
    caplog.clear()
    for _ in range(50):
        assert (await client.post("/pubsub/push", data=envelope(b"{}"))).status == 401
    refused = runtime.metrics.registry.get_sample_value(
        "clickflow_push_refused_total", {"source": "pubsub_push", "reason": "missing_token"}
    )
    assert refused == 50
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines == ["pubsub_push: refused a push request (401): missing bearer token"]
    push = runtime.sources[0]
    push._refusals.next_line["missing_token"] = 0.0  # as if the interval had passed
    assert (await client.post("/pubsub/push", data=envelope(b"{}"))).status == 401
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert lines[1:] == [
        "pubsub_push: refused a push request (401): missing bearer token (and 49 more since the last line)"
    ]


@pytest.mark.asyncio
async def test_a_malformed_envelope_is_dead_lettered_and_answered_2xx(
    push_client: tuple[Any, Runtime], keys: dict[str, Any]
) -> None:
    client, runtime = push_client
    response = await client.post("/pubsub/push", data=b"definitely not an envelope",
                                 headers={"Authorization": f"Bearer {token(keys['google'])}"})  # fmt: skip
    assert response.status == 204
    assert runtime.summary.dead_letters == {"invalid_json": 1}


@pytest.mark.asyncio
async def test_oversized_bodies_are_refused(push_client: tuple[Any, Runtime], keys: dict[str, Any]) -> None:
    client, _ = push_client
    response = await client.post("/pubsub/push", data=io.BytesIO(b"x" * (MAX_ENVELOPE_BYTES + 1)),
                                 headers={"Authorization": f"Bearer {token(keys['google'])}"})  # fmt: skip
    assert response.status == 413


@pytest.mark.integration
@pytest.mark.parametrize("sink_options", ["", ", commit_every: 200ms"], ids=["per-batch", "logged"])
def test_emulator_push_subscription_delivers_every_message(
    pubsub_emulator: PubSubEmulator, tmp_path: Path, sink_options: str
) -> None:
    port, db = free_port(), tmp_path / "push.duckdb"
    pipeline = tmp_path / "push.yaml"
    pipeline.write_text(
        "sources: [{type: pubsub_push, auth: none}]\n"
        f"sinks: [{{type: duckdb, path: '{db}', batch: {{max_age: 100ms}}{sink_options}}}]\n"
        f"monitor: {{port: {port}}}\n"
    )
    process = start_clickflow(pipeline, pubsub_emulator.host)
    try:
        wait_for(lambda: metric(port, "clickflow_messages_received_total") >= 0, 30)
        topic = pubsub_emulator.topic(tmp_path.name)  # one per parameter: the emulator is shared
        pubsub_emulator.subscription(tmp_path.name, topic, push_endpoint=f"http://127.0.0.1:{port}/pubsub/push")
        payloads = list(VisitGenerator(seed=6, malformed_rate=0.1).messages(500))
        ids = pubsub_emulator.publish(topic, payloads)
        wait_for(lambda: metric(port, "clickflow_messages_acknowledged_total") >= 500, 120)
        process.send_signal(signal.SIGTERM)
    finally:
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert table_counts(db) == expected_counts(payloads, ids)


@pytest.mark.parametrize("command", ["validate", "run"])
def test_push_without_a_monitor_section_is_refused_by_validate_and_run(tmp_path: Path, command: str) -> None:
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"sources: [{{type: pubsub_push, auth: none}}]\nsinks: [{{type: duckdb, path: '{tmp_path}/x.db'}}]\n"
    )
    result = clickflow(command, str(pipeline))
    assert result.returncode == 2
    assert (
        f"{pipeline}:1: sources[0]: source 'pubsub_push' serves /pubsub/push: add a monitor: section" in result.stderr
    )


def test_validate_prints_and_run_logs_a_warning_for_push_into_duckdb_without_commit_every(tmp_path: Path) -> None:
    port = free_port()
    pipeline = tmp_path / "p.yaml"
    pipeline.write_text(
        f"sources: [{{type: pubsub_push, auth: none}}]\nsinks: [{{type: duckdb, path: '{tmp_path}/x.db'}}]\n"
        f"monitor: {{port: {port}}}\n"
    )
    where = f"{pipeline}:2: sinks[0]: "
    warning = "source 'pubsub_push' answers its senders only once their messages"
    validated = clickflow("validate", str(pipeline))
    assert validated.returncode == 0 and validated.stdout == f"{pipeline}: ok\n"
    assert validated.stderr.startswith(f"{where}warning: {warning}") and validated.stderr.count("\n") == 1
    logged = {}
    for log_format in ("text", "json"):
        process = subprocess.Popen([*CLICKFLOW, "run", "--log-format", log_format, str(pipeline)], cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            wait_for(lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5).status == 200, 60)
            process.send_signal(signal.SIGTERM)
        finally:
            _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr
        logged[log_format] = stderr.splitlines()[0]
    assert f" WARNING clickflow.cli: {where}{warning}" in logged["text"]  # said once, by the level
    entry = json.loads(logged["json"])
    assert entry["severity"] == "WARNING" and entry["message"].startswith(f"{where}{warning}")
    listed = clickflow("dlq", "list", str(pipeline))  # a warning about running, not about reading
    assert listed.returncode == 0 and listed.stderr == "", listed.stderr


@pytest_asyncio.fixture
async def fake_push(aiohttp_client: Any) -> AsyncIterator[Callable[[str], Any]]:
    """A push endpoint in front of the fake sinks of tests/fakes.py, for saturation and failure."""
    from clickflow.config import parse_pipeline
    from clickflow.plugins import load_plugins
    from tests import fakes

    fakes.reset()
    registry = load_plugins(extra=[(sys.modules["tests.fakes"], "tests")])
    runtimes: list[tuple[Runtime, asyncio.Task[Any]]] = []

    async def start(sink: str, timeouts: str = "enter_timeout: 50ms, ack_timeout: 2s") -> Any:
        runtime = Runtime(parse_pipeline(
            f"sources: [{{type: pubsub_push, auth: none, {timeouts}}}]\nsinks: [{sink}]\n"
            "runtime: {channel_capacity: 1, shutdown_timeout: 1s}\nmonitor: {port: 0}\n", registry, "t.yaml", {},
        ))  # fmt: skip
        client = await aiohttp_client(build_app(runtime))
        runtimes.append((runtime, asyncio.create_task(runtime.run())))
        while not runtime.heartbeats:  # noqa: ASYNC110 - the runtime exposes no "running" event
            await asyncio.sleep(0.01)
        return client

    start.runtimes = runtimes  # type: ignore[attr-defined]
    yield start
    for runtime, task in runtimes:
        runtime.request_stop()
        await task
    fakes.reset()


@pytest.mark.asyncio
async def test_requests_arriving_together_share_a_batch_and_each_waits_for_its_rows(
    fake_push: Callable[[str], Any],
) -> None:
    from tests.fakes import MemorySink

    client = await fake_push("{type: memory, batch: {max_age: 50ms}}")
    bodies = [envelope(b'{"session_id": "S%d"}' % i, str(i)) for i in range(200)]
    statuses = await asyncio.gather(*(client.post("/pubsub/push", data=body) for body in bodies))
    assert [r.status for r in statuses] == [204] * 200
    stored = {row[12] for _, batch in MemorySink.writes for row in batch.tables["visits"]}
    assert stored == {str(i) for i in range(200)}
    (runtime, *_) = [r for r, _ in fake_push.runtimes]  # type: ignore[attr-defined]
    registry = runtime.metrics.registry
    batches = registry.get_sample_value("clickflow_push_batch_requests_count", {"source": "pubsub_push"})
    assert registry.get_sample_value("clickflow_push_batch_requests_sum", {"source": "pubsub_push"}) == 200
    assert batches < 100, "concurrent requests should share batches"


@pytest.mark.asyncio
async def test_a_failing_sink_is_answered_503_so_pubsub_retries(fake_push: Callable[[str], Any]) -> None:
    client = await fake_push("{type: memory, fail_first: 1000, batch: {max_rows: 1}, retry: {attempts: 1}}")
    response = await client.post("/pubsub/push", data=envelope(b'{"session_id": "S"}'))
    assert response.status == 503


@pytest.mark.asyncio
async def test_the_live_view_counts_a_message_pubsub_sends_again_once(fake_push: Callable[[str], Any]) -> None:
    from clickflow_live.sink import LiveSink

    client = await fake_push("{type: memory, fail_first: 1, retry: {attempts: 1}, batch: {max_age: 0s}}, {type: live}")
    visit = next(VisitGenerator(seed=8).messages(1))
    events = len(VisitParser().parse([Message(visit, "once")], "s", 0).tables["events"])
    statuses = [(await client.post("/pubsub/push", data=envelope(visit, "once"))).status for _ in range(2)]
    (runtime, *_) = [r for r, _ in fake_push.runtimes]  # type: ignore[attr-defined]
    live = runtime.sinks[1]
    assert isinstance(live, LiveSink)
    assert statuses == [503, 204]  # the storage sink failed the first delivery; Pub/Sub sent it again
    assert events > 0 and live.totals == {"messages": 1, "events": events, "redelivered": 1}


@pytest.mark.asyncio
async def test_a_request_the_sinks_do_not_settle_within_ack_timeout_is_answered_503(
    fake_push: Callable[..., Any],
) -> None:
    from tests.fakes import MemorySink

    MemorySink.gate = asyncio.Event()  # type: ignore[assignment] - the sink hangs until the end
    client = await fake_push("{type: memory, gated: true, batch: {max_age: 0s}}", "ack_timeout: 300ms")
    started = time.monotonic()
    response = await client.post("/pubsub/push", data=envelope(b'{"session_id": "S"}'))
    waited = time.monotonic() - started
    MemorySink.gate.set()
    assert response.status == 503 and "not stored" in await response.text()
    assert 0.3 <= waited < 5


def one_after_another(client: Any, count: int) -> list[asyncio.Task[int]]:
    """Push requests 20 ms apart, each filling the pipeline a little more; their statuses."""

    async def push(i: int) -> int:
        await asyncio.sleep(0.02 * i)
        return (await client.post("/pubsub/push", data=envelope(b'{"session_id": "S"}', str(i)))).status

    return [asyncio.create_task(push(i)) for i in range(count)]


@pytest.mark.asyncio
async def test_a_saturated_pipeline_is_answered_429(fake_push: Callable[[str], Any]) -> None:
    from tests.fakes import MemorySink

    MemorySink.gate = asyncio.Event()  # type: ignore[assignment] - the sink hangs until the end
    client = await fake_push("{type: memory, gated: true, batch: {max_rows: 1}}")

    statuses = [await post for post in one_after_another(client, 12)]
    MemorySink.gate.set()
    assert 429 in statuses


@pytest.mark.asyncio
async def test_each_waiting_request_is_refused_when_its_own_enter_timeout_passes(
    fake_push: Callable[..., Any],
) -> None:
    """The endpoint keeps every waiting request's ``enter_timeout`` with one timer, set for the
    oldest: each request is answered 429 once its own has passed, not sooner, and not later."""
    from tests.fakes import MemorySink

    MemorySink.gate = asyncio.Event()  # type: ignore[assignment] - the sink hangs: the pipeline fills up
    client = await fake_push(
        "{type: memory, gated: true, batch: {max_rows: 1}}", "enter_timeout: 300ms, ack_timeout: 3s"
    )

    async def push(i: int) -> tuple[int, float]:
        await asyncio.sleep(0.05 * i)
        started = time.monotonic()
        response = await client.post("/pubsub/push", data=envelope(b'{"session_id": "S"}', str(i)))
        return response.status, time.monotonic() - started

    answers = await asyncio.gather(*(push(i) for i in range(16)))
    MemorySink.gate.set()
    refused = [waited for status, waited in answers if status == 429]
    assert len(refused) >= 8, answers  # a few entered and hang on the sink (503 after ack_timeout)
    assert all(0.29 <= waited < 0.6 for waited in refused), answers
    assert {status for status, _ in answers} <= {429, 503}, "nothing is answered 2xx unless stored"


@pytest.mark.asyncio
async def test_the_enter_timer_runs_once_for_a_deadline_between_two_milliseconds(
    fake_push: Callable[..., Any],
) -> None:
    """uvloop's clock counts milliseconds: the endpoint's timer counts a deadline within one as
    passed, instead of setting itself again on every turn of the loop until the next."""
    from tests.fakes import MemorySink

    MemorySink.gate = asyncio.Event()  # type: ignore[assignment] - the sink hangs: the pipeline fills up
    client = await fake_push(
        "{type: memory, gated: true, batch: {max_rows: 1}}", "enter_timeout: 300.4ms, ack_timeout: 2s"
    )
    (runtime, _) = fake_push.runtimes[0]  # type: ignore[attr-defined]
    (source,) = runtime.sources
    runs = 0
    not_entered = source._not_entered

    def counted() -> None:
        nonlocal runs
        runs += 1
        not_entered()

    source._not_entered = counted  # the endpoint sets its timer with whatever this attribute holds
    statuses = [await post for post in one_after_another(client, 8)]
    MemorySink.gate.set()
    assert 429 in statuses
    assert runs <= len(statuses) + 1, f"the timer ran {runs} times for {len(statuses)} requests"


@pytest.mark.asyncio
async def test_requests_still_waiting_to_enter_when_the_endpoint_stops_are_answered_at_once(
    fake_push: Callable[..., Any],
) -> None:
    from tests.fakes import MemorySink

    MemorySink.gate = asyncio.Event()  # type: ignore[assignment] - the sink hangs: the pipeline fills up
    client = await fake_push("{type: memory, gated: true, batch: {max_rows: 1}}", "enter_timeout: 60s")
    (runtime, _) = fake_push.runtimes[0]  # type: ignore[attr-defined]
    posts = one_after_another(client, 12)
    await asyncio.sleep(0.5)
    started = time.monotonic()
    runtime.request_stop()
    statuses = sorted([await post for post in posts])
    MemorySink.gate.set()
    assert time.monotonic() - started < 10, "waiting requests were held until enter_timeout"
    assert 429 in statuses, "requests that never entered are handed back to Pub/Sub"
    assert set(statuses) <= {429, 503}, "nothing is answered 2xx unless stored"
