"""The push endpoint against what an attacker or a broken network sends: every answer is a deliberate
status (never 500), push auth never fails open, nothing is stored twice and nothing is lost."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import logging
import resource
import socket
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import jwt
import pytest
from aiohttp import web

from clickflow.config import MonitorOptions, parse_pipeline
from clickflow.monitor import serve
from clickflow.plugins import Registry, load_plugins
from clickflow.runtime import Runtime
from clickflow_pubsub.oidc import AuthError, TokenVerifier
from tests.conftest import table_counts
from tests.emulators import metric
from tests.test_pubsub_push import envelope, keys
from tests.tokens import AUDIENCE, SENDER, key_set, token

__all__ = ["keys"]  # a fixture
pytestmark = pytest.mark.event_loops  # on uvloop too, which serves the endpoint in a run


@asynccontextmanager
async def keys_server(aiohttp_server: Any, answer: Callable[[], web.StreamResponse] | None) -> AsyncIterator[Any]:
    """A signing-keys endpoint answering ``answer()`` (None: nothing listens), counting its requests."""
    calls: list[float] = []

    async def certs(_: web.Request) -> web.StreamResponse:
        calls.append(time.monotonic())
        assert answer is not None
        response = answer()
        if isinstance(response, web.Response) and response.status == 299:  # slow: answer after a while
            await asyncio.sleep(3)
            return web.json_response({"keys": []})
        return response

    if answer is None:
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            yield f"http://127.0.0.1:{closed.getsockname()[1]}/certs", calls
        return
    app = web.Application()
    app.router.add_get("/certs", certs)
    server = await aiohttp_server(app)
    yield str(server.make_url("/certs")), calls


ANSWERS: dict[str, Callable[[], web.StreamResponse] | None] = {
    "unreachable": None,
    "5xx": lambda: web.Response(status=503, text="down"),
    "not JSON": lambda: web.Response(text="<html>oops</html>"),
    "not a key set": lambda: web.json_response({"keys": [{"kid": "k1", "kty": "nonsense"}]}),
    "slow": lambda: web.Response(status=299),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("failure", list(ANSWERS))
async def test_unavailable_signing_keys_give_503_and_one_fetch_per_interval(
    aiohttp_server: Any, keys: dict[str, Any], failure: str, caplog: pytest.LogCaptureFixture
) -> None:
    async with keys_server(aiohttp_server, ANSWERS[failure]) as (url, calls), aiohttp.ClientSession() as session:
        verifier = TokenVerifier(AUDIENCE, url, [SENDER], refresh_interval=30, fetch_timeout=0.5)
        statuses = []
        for _ in range(20):
            try:
                await verifier.verify(f"Bearer {token(keys['google'])}", session)
            except AuthError as exc:
                statuses.append((exc.status, exc.code))
    assert statuses == [(503, "keys_unavailable")] * 20
    assert len(calls) <= 1
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1
    assert "Traceback" not in caplog.text


@pytest.mark.asyncio
async def test_a_flood_of_unknown_key_ids_fetches_the_keys_once_per_interval(
    aiohttp_server: Any, keys: dict[str, Any]
) -> None:
    ok = key_set(keys["google"])
    server = keys_server(aiohttp_server, lambda: web.json_response(ok))
    async with server as (url, calls), aiohttp.ClientSession() as session:
        verifier = TokenVerifier(AUDIENCE, url, [SENDER], refresh_interval=30)
        assert (await verifier.verify(f"Bearer {token(keys['google'])}", session))["email"] == SENDER
        for n in range(50):
            forged = jwt.encode({"aud": AUDIENCE}, keys["forger"], algorithm="RS256", headers={"kid": f"x{n}"})
            with pytest.raises(AuthError) as refused:
                await verifier.verify(f"Bearer {forged}", session)
            assert (refused.value.status, refused.value.code) == (401, "unknown_key")
    assert len(calls) == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("claims", "headers", "code"),
    [
        ({"email": [SENDER]}, {}, "sender_not_allowed"),
        ({"email": {"a": 1}}, {}, "sender_not_allowed"),
        ({"email_verified": "true"}, {}, "sender_not_allowed"),
        ({}, {"kid": ["k1"]}, "malformed_token"),
        ({}, {"kid": {"k": 1}}, "malformed_token"),
        ({"aud": [1, 2]}, {}, "wrong_audience"),
        ({"iss": ["https://accounts.google.com"]}, {}, "invalid_token"),
    ],
)
async def test_odd_claims_and_headers_are_refused_not_crashed(
    aiohttp_server: Any, keys: dict[str, Any], claims: dict[str, Any], headers: dict[str, Any], code: str
) -> None:
    ok = key_set(keys["google"])
    now = int(time.time())
    payload = {"iss": "https://accounts.google.com", "aud": AUDIENCE, "iat": now, "exp": now + 300,
               "email": SENDER, "email_verified": True, **claims}  # fmt: skip
    claims_json = json.dumps(payload).encode()  # signed as they are: PyJWT would refuse to write a list as iss
    bearer = jwt.api_jws.PyJWS().encode(claims_json, keys["google"], algorithm="RS256", headers={"kid": "k1"})
    if headers:  # PyJWT will not write a key id that is not text; an attacker will
        header = json.dumps({"alg": "RS256", "typ": "JWT", **headers}).encode()
        bearer = base64.urlsafe_b64encode(header).rstrip(b"=").decode() + bearer[bearer.index(".") :]
    async with keys_server(aiohttp_server, lambda: web.json_response(ok)) as (url, _), aiohttp.ClientSession() as s:
        with pytest.raises(AuthError) as refused:
            await TokenVerifier(AUDIENCE, url, [SENDER]).verify(f"Bearer {bearer}", s)
    assert refused.value.code == code and refused.value.status in (401, 403)


@pytest.fixture(scope="module")
def with_slow_sink() -> Registry:
    from tests import flaky_sink

    return load_plugins(extra=[(flaky_sink, "tests")])


@pytest.fixture
def served(with_slow_sink: Registry, tmp_path: Path) -> Callable[..., Any]:
    """A push pipeline (``auth: none``) into DuckDB served on a real port; yields its URL and
    runtime. With ``hold``, each write waits that long first."""

    @asynccontextmanager
    async def start(
        options: str = "", monitor: str = "", max_age: str = "20ms", hold: str = "0s"
    ) -> AsyncIterator[tuple[str, Runtime]]:
        sink = f"type: flaky_duckdb, hold: {hold}, path: '{tmp_path}/push.duckdb', batch: {{max_age: {max_age}}}"
        source = f"type: pubsub_push, auth: none, {options}"
        text = f"sources: [{{{source}}}]\nsinks: [{{{sink}}}]\nmonitor: {{port: 0, {monitor}}}\n"
        loaded = parse_pipeline(text, with_slow_sink, "served.yaml", {})
        runtime = Runtime(loaded)
        assert loaded.monitor is not None
        async with serve(runtime, loaded.monitor) as url:
            task = asyncio.create_task(runtime.run())
            while not runtime.heartbeats:  # noqa: ASYNC110 - the runtime exposes no "running" event
                await asyncio.sleep(0.01)
            try:
                yield url, runtime
            finally:
                runtime.request_stop()
                await task

    return start


HOSTILE_BODIES: list[tuple[str, bytes, str]] = [
    ("empty", b"", "application/json"),
    ("not JSON", b"\x00\xff" * 100, "application/json"),
    ("form", b"a=1&b=2", "application/x-www-form-urlencoded"),
    ("envelope without message", b'{"subscription": "s"}', "application/json"),
    ("message not an object", b'{"message": [1, 2]}', "application/json"),
    ("data not base64", b'{"message": {"data": "%%%", "messageId": "1"}}', "application/json"),
    ("data not a string", b'{"message": {"data": 5, "messageId": "2"}}', "application/json"),
    ("id not a string", b'{"message": {"data": "e30=", "messageId": {"x": 1}}}', "application/json"),
    ("deep JSON", b"[" * 100_000, "application/json"),
    ("deep payload", envelope(b'{"session_id":"s","events":' + b"[" * 5000), "application/json"),
    ("multipart", b"--x\r\n\r\nhi\r\n--x--", "multipart/form-data; boundary=x"),
    ("text", b"hello", "text/plain; charset=latin-1"),
]


@pytest.mark.asyncio
async def test_every_hostile_body_gets_a_deliberate_answer_and_a_dead_letter(served: Callable[..., Any]) -> None:
    async with served() as (url, runtime), aiohttp.ClientSession() as session:
        for name, body, content_type in HOSTILE_BODIES:
            async with session.post(f"{url}/pubsub/push", data=body, headers={"Content-Type": content_type}) as answer:
                assert answer.status == 204, name
        async with session.get(f"{url}/pubsub/push") as wrong_method:
            assert wrong_method.status == 405
    assert runtime.summary.acknowledged == len(HOSTILE_BODIES)
    assert sum(runtime.summary.dead_letters.values()) == len(HOSTILE_BODIES)


@pytest.mark.asyncio
async def test_a_body_over_the_limit_is_413_whatever_its_headers_say(served: Callable[..., Any]) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(40):
            yield b"x" * 1024

    async with served("max_body_bytes: 16KiB") as (url, runtime), aiohttp.ClientSession() as session:
        answer = await session.post(f"{url}/pubsub/push", data=chunks())  # chunked: no Content-Length
        assert answer.status == 413
    assert sum(runtime.summary.messages.values()) == 0


def _bomb(wbits: int) -> bytes:
    """256 MiB of zeros, compressed to about 250 KB."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, wbits)
    return b"".join(compressor.compress(bytes(1 << 24)) for _ in range(16)) + compressor.flush()


async def _status(url: str, request: bytes) -> int:
    """The status the server answers a raw request with; it may answer and close before it has
    read all of it, which a client library reports as a broken connection instead."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    with contextlib.suppress(ConnectionError):
        await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 10)
    writer.close()
    return int(status_line.split()[1])


async def _post_status(url: str, encoding: str, body: bytes) -> int:
    head = (
        f"POST /pubsub/push HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Encoding: {encoding}\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return await _status(url, head.encode() + body)


@pytest.mark.asyncio
async def test_compressed_bodies_count_what_they_inflate_to_and_undecodable_ones_are_400(
    served: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A compression bomb is refused as too large without being inflated whole; a body that is not
    in the encoding it names (it used to be a 500 and a traceback) is 400, and a well-formed
    compressed envelope is stored."""
    gzip_bomb, zlib_bomb = _bomb(31), _bomb(15)
    compressed = gzip.compress(envelope(b'{"session_id": "gz"}', "gz-1"))
    cases = [
        ("gzip", gzip_bomb, 413),
        ("deflate", zlib_bomb, 413),
        ("deflate", gzip_bomb, 400),  # gzip's framing where deflate is named
        ("gzip", b"not compressed at all", 400),
        ("gzip", compressed, 204),
    ]
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    async with served("max_body_bytes: 1MiB") as (url, runtime):
        for encoding, body, expected in cases:
            assert await _post_status(url, encoding, body) == expected, (encoding, len(body))
    assert (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before) * 1024 < 64 << 20
    assert runtime.summary.acknowledged == 1
    assert "Traceback" not in caplog.text


MALFORMED_REQUESTS = [
    b"POST /pubsub/push HTTP/1.1\r\nHost: x\r\nNoColon\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /pubsub/push HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n{}",
    b"POST /pubsub/push HTTP/9.9\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /pubsub/push HTTP/1.1\r\nHost: x\r\nContent-Encoding: br\r\nContent-Length: 2\r\n\r\n{}",
    b"POST /pubsub/push HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    b"POST /pubsub/push HTTP/1.1\r\nHost: x\r\nX: \x00\x1b[31m\r\nContent-Length: 2\r\n\r\n{}",
]


@pytest.mark.asyncio
async def test_a_malformed_request_is_400_and_one_warning_line_a_cause(
    served: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    """aiohttp logs each at ERROR with a traceback: anyone who reaches the port could fill the log,
    and error reporting, with them. Each cause is one WARNING line every 10 s, saying how many it
    left out."""
    async with served() as (url, runtime):
        caplog.clear()
        for raw in MALFORMED_REQUESTS:
            assert await _status(url, raw) == 400, raw
        first = [r for r in caplog.records if r.name == "aiohttp.server"]
        for _ in range(20):  # the same again: counted, not logged
            assert await _status(url, MALFORMED_REQUESTS[1]) == 400
        again = [r for r in caplog.records if r.name == "aiohttp.server"]
        (throttle,) = [f._throttle for f in logging.getLogger("aiohttp.server").filters if hasattr(f, "_throttle")]
        left_out = dict(throttle.left_out)
        throttle.next_line.clear()  # as if the interval had passed
        assert await _status(url, MALFORMED_REQUESTS[1]) == 400
        later = [r for r in caplog.records if r.name == "aiohttp.server"][len(again) :]
        port = int(url.rsplit(":", 1)[1])
        counted = await asyncio.to_thread(metric, port, "clickflow_monitor_bad_requests_total")
    assert counted == len(MALFORMED_REQUESTS) + 20 + 1  # every one, logged or not, by cause
    assert sum(runtime.summary.messages.values()) == 0
    assert 3 <= len(first) < len(MALFORMED_REQUESTS)  # several causes, some of them shared
    assert {r.levelname for r in first} == {"WARNING"}
    assert all("\n" not in r.getMessage() and r.exc_info is None for r in first)
    assert again == first
    (line,) = later
    assert "Content-Length" in line.getMessage()
    assert sum(left_out.values()) == 20 + len(MALFORMED_REQUESTS) - len(first)  # each request logged or counted
    assert line.getMessage().endswith(f" (and {max(left_out.values())} more since the last line)")
    assert "Traceback" not in caplog.text
    assert not [f for f in logging.getLogger("aiohttp.server").filters if hasattr(f, "_throttle")]  # removed


@pytest.mark.asyncio
async def test_a_slow_body_is_answered_408_and_a_cut_body_logs_one_line(
    served: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    async with served("read_timeout: 300ms") as (url, runtime):
        host, port = url.removeprefix("http://").split(":")
        head = b"POST /pubsub/push HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n"
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(head + b"{")
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 5)
        writer.close()
        assert status_line.startswith(b"HTTP/1.1 408")

        caplog.clear()
        for _ in range(3):  # a line for the first; the others within the interval are only counted
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(head + b"{")
            await writer.drain()
            writer.transport.abort()  # the client goes away mid-body
            await asyncio.sleep(0.3)
        refused = runtime.metrics.registry.get_sample_value(
            "clickflow_push_refused_total", {"source": "pubsub_push", "reason": "body_cut_off"}
        )
    assert sum(runtime.summary.messages.values()) == 0
    assert refused == 3
    cut = [r for r in caplog.records if "cut off" in r.getMessage()]
    assert len(cut) == 1 and cut[0].exc_info is None
    assert "Traceback" not in caplog.text


@pytest.mark.asyncio
async def test_connections_that_never_finish_their_headers_are_closed(served: Callable[..., Any]) -> None:
    async with served(monitor="idle_timeout: 500ms") as (url, _):
        host, port = url.removeprefix("http://").split(":")
        connections = [await asyncio.open_connection(host, int(port)) for _ in range(50)]
        for _, writer in connections:
            writer.write(b"POST /pubsub/push HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            await writer.drain()
        started = time.monotonic()
        closed = await asyncio.wait_for(asyncio.gather(*(reader.read() for reader, _ in connections)), 10)
        took = time.monotonic() - started
        for _, writer in connections:
            writer.close()
        assert all(data == b"" for data in closed)
        assert took < 5


@pytest.mark.asyncio
async def test_a_concurrent_flood_stores_every_message_once(served: Callable[..., Any], tmp_path: Path) -> None:
    count = 400
    async with served("enter_timeout: 10s") as (url, runtime), aiohttp.ClientSession() as session:

        async def push(n: int) -> int:
            body = envelope(b'{"session_id": "S-%d", "events": []}' % (n % 350), str(n % 350))
            async with session.post(f"{url}/pubsub/push", data=body) as answer:
                return answer.status

        statuses = await asyncio.gather(*(push(n) for n in range(count)))
    assert statuses == [204] * count
    assert runtime.summary.acknowledged == count
    assert table_counts(tmp_path / "push.duckdb") == {"visits": 350, "events": 0, "purchase_items": 0, "dead_letter": 0}


@pytest.mark.asyncio
async def test_a_lone_request_is_answered_once_stored_not_after_the_sinks_max_age(
    served: Callable[..., Any], tmp_path: Path
) -> None:
    """Its sender waits for the answer: with DuckDB's default ``max_age`` of 5 s, every request
    took 5 s unless the pipeline said ``max_age: 0s``."""
    async with served(max_age="30s") as (url, runtime), aiohttp.ClientSession() as session:
        for n in range(3):
            started = time.monotonic()
            body = envelope(b'{"session_id": "S-%d", "events": []}' % n, str(n))
            async with session.post(f"{url}/pubsub/push", data=body) as answer:
                assert answer.status == 204
            assert time.monotonic() - started < 5
    assert runtime.summary.acknowledged == 3
    assert table_counts(tmp_path / "push.duckdb")["visits"] == 3


async def _in_chunks(body: bytes) -> AsyncIterator[bytes]:
    """A body sent chunked: without a Content-Length."""
    for at in range(0, len(body), 1 << 16):
        yield body[at : at + (1 << 16)]


SENT_AS: dict[str, Callable[[bytes], dict[str, Any]]] = {
    "with its length": lambda body: {"data": body},
    "gzip'd": lambda body: {"data": gzip.compress(body), "headers": {"Content-Encoding": "gzip"}},
    "chunked": lambda body: {"data": _in_chunks(body)},
}


@pytest.mark.asyncio
@pytest.mark.parametrize("sent_as", list(SENT_AS))
async def test_bodies_over_max_pending_bytes_are_refused_at_once_and_the_others_stored(
    served: Callable[..., Any], tmp_path: Path, sent_as: str
) -> None:
    """Bodies waiting for their batch count against ``max_pending_bytes``: a request that would go
    over is answered 429 at once (Pub/Sub sends it again later), so a burst of large messages
    cannot exhaust memory, and the requests already held are stored. A body counts what it
    inflates to: a gzip'd one counted its compressed length, so bodies of a few kilobytes each
    held 400 KB past the limit."""
    pad = b"x" * 300_000

    def body(n: int) -> bytes:  # about 400 KB: two fit in 1 MiB, three do not
        return envelope(b'{"session_id": "S-%d", "pad": "%s", "events": []}' % (n, pad), str(n))

    options = "max_body_bytes: 512KiB, max_pending_bytes: 1MiB"
    async with served(options, hold="1s") as (url, runtime), aiohttp.ClientSession() as session:

        async def push(n: int) -> int:
            async with session.post(f"{url}/pubsub/push", **SENT_AS[sent_as](body(n))) as answer:
                return answer.status

        def pending() -> float:
            value = runtime.metrics.registry.get_sample_value("clickflow_push_pending_bytes", {"source": "pubsub_push"})
            return value or 0.0

        held = [asyncio.create_task(push(n)) for n in range(2)]
        with anyio.fail_after(5):
            while pending() < 2 * len(body(0)):  # noqa: ASYNC110 - the gauge is what is being tested
                await asyncio.sleep(0.01)
        started = time.monotonic()
        assert await push(2) == 429
        assert time.monotonic() - started < 0.5  # at once, not after the held batch
        assert await asyncio.gather(*held) == [204, 204]
        assert pending() == 0
        assert await push(3) == 204
        refused = runtime.metrics.registry.get_sample_value(
            "clickflow_push_refused_total", {"source": "pubsub_push", "reason": "pending_bytes"}
        )
    assert refused == 1
    assert table_counts(tmp_path / "push.duckdb")["visits"] == 3


@pytest.mark.asyncio
async def test_a_body_without_a_length_holds_what_it_sends(served: Callable[..., Any], tmp_path: Path) -> None:
    """Not ``max_body_bytes``: with 1 MiB pending and bodies of up to 512 KiB, only two chunked
    requests of any size could wait for their batch at once."""
    options = "max_body_bytes: 512KiB, max_pending_bytes: 1MiB"
    async with served(options, hold="1s") as (url, runtime), aiohttp.ClientSession() as session:

        async def push(n: int) -> int:
            body = envelope(b'{"session_id": "S-%d", "events": []}' % n, str(n))
            async with session.post(f"{url}/pubsub/push", data=_in_chunks(body)) as answer:
                return answer.status

        assert await asyncio.gather(*(push(n) for n in range(20))) == [204] * 20
    assert runtime.summary.acknowledged == 20
    assert table_counts(tmp_path / "push.duckdb")["visits"] == 20


def test_push_auth_never_fails_open_on_the_example_pipeline(registry: Any) -> None:
    from clickflow.config import ConfigError, load_pipeline
    from tests.conftest import REPO

    for audience in ("", "   "):
        with pytest.raises(ConfigError) as refused:
            load_pipeline(REPO / "config/push.yaml", registry,
                          {"PUSH_AUDIENCE": audience, "PUSH_SERVICE_ACCOUNT": SENDER, "PROJECT_ID": "p"})  # fmt: skip
        assert "authenticated by default" in str(refused.value)
    loaded = load_pipeline(REPO / "config/push.yaml", registry,
                           {"PUSH_AUDIENCE": AUDIENCE, "PUSH_SERVICE_ACCOUNT": SENDER, "PROJECT_ID": "p"})  # fmt: skip
    assert loaded.sources[0].options.auth == "oidc"  # type: ignore[attr-defined]
    assert isinstance(loaded.monitor, MonitorOptions)
