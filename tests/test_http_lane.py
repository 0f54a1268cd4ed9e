"""The PATCH lane (effects/http.py): keep-alive, stale connections, deadlines, cancellation,
cut answers, TLS; and the task API's request path over it against the real sandbox."""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from processor.config import AuthMethod
from processor.effects.api import ApiError, TaskApi
from processor.effects.auth import TokenProvider
from processor.effects.guard import Guard
from processor.effects.http import CHECK_IDLE_AFTER, Http1Lane, LaneError, build_client
from processor.effects.metrics import Metrics
from processor.pure.breaker import BreakerConfig
from processor.pure.retry import ErrorKind
from processor.sandbox.app import Fault
from processor.wiring import token_config
from tests.conftest import make_settings

OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
Handler = Callable[[trio.SocketStream, int], Awaitable[None]]


async def read_request(stream: trio.SocketStream, buf: bytearray) -> bytes | None:
    """One whole request (head + Content-Length body) from `buf`+stream; None at EOF."""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        buf += chunk
    head, _, rest = bytes(buf).partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return None
        rest += chunk
    del buf[:]
    buf += rest[length:]
    return head + b"\r\n\r\n" + rest[:length]


class RawServer:
    """A loopback TCP server whose handler writes raw bytes: the awkward answers a real
    server can give, byte for byte."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.port = 0

    async def serve(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._conn, listeners)

    async def _conn(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        try:
            await self.handler(stream, self.connections)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            await trio.aclose_forcefully(stream)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


async def start(nursery, handler: Handler) -> RawServer:
    server = RawServer(handler)
    await nursery.start(server.serve)
    return server


def keepalive(server_requests: list[bytes], answer: bytes = OK, *, close_after: int | None = None) -> Handler:
    async def handler(stream: trio.SocketStream, n: int) -> None:
        buf = bytearray()
        served = 0
        while (req := await read_request(stream, buf)) is not None:
            server_requests.append(req)
            await stream.send_all(answer)
            served += 1
            if close_after is not None and served >= close_after:
                return  # closes the connection without saying so (no Connection: close)

    return handler


def lane_for(url: str, timeout: float = 5.0) -> Http1Lane:
    return Http1Lane(url, connections=4, timeout=timeout)


async def patch(lane: Http1Lane, body: bytes = b'{"state":"in_progress"}'):
    return await lane.request(b"PATCH", b"/api/ai-tasks/abc", [*lane.base_headers(), (b"Content-Type", b"application/json")], body)


async def test_one_connection_is_kept_alive_and_each_request_is_one_write(nursery):
    requests: list[bytes] = []
    server = await start(nursery, keepalive(requests))
    lane = lane_for(server.url)
    for _ in range(5):
        resp = await patch(lane)
        assert (resp.status, resp.body, resp.header(b"content-type")) == (200, b"{}", "application/json")
    assert server.connections == 1 and lane.opened == 1
    assert len(requests) == 5
    head, _, body = requests[0].partition(b"\r\n\r\n")
    assert head.startswith(b"PATCH /api/ai-tasks/abc HTTP/1.1\r\n")
    assert b"content-length: 23" in head.lower() and body == b'{"state":"in_progress"}'
    await lane.aclose()


async def test_base_url_path_prefix_is_kept(nursery):
    requests: list[bytes] = []
    server = await start(nursery, keepalive(requests))
    lane = lane_for(server.url + "/prefix/")
    await patch(lane)
    assert requests[0].startswith(b"PATCH /prefix/api/ai-tasks/abc HTTP/1.1")


async def test_a_connection_closed_right_after_an_answer_is_retried_once_on_a_new_one(nursery):
    """The server closes each connection after one answer, without `Connection: close`:
    the next request finds the reused connection dead before any answer byte."""
    requests: list[bytes] = []
    server = await start(nursery, keepalive(requests, close_after=1))
    lane = lane_for(server.url)
    for _ in range(3):
        assert (await patch(lane)).status == 200
    assert server.connections == 3 and lane.resent == 2
    # each request reached the server exactly once, or twice when the server got the
    # request before it closed; here the server closes before reading a second one
    assert len(requests) == 3


async def test_an_idle_connection_the_server_closed_is_dropped_before_use(nursery, mock_clock):
    requests: list[bytes] = []
    server = await start(nursery, keepalive(requests, close_after=1))
    lane = lane_for(server.url)
    assert (await patch(lane)).status == 200
    await trio.testing.wait_all_tasks_blocked()  # the server has closed its end
    idle_socket = lane._idle[0].stream.socket  # type: ignore[attr-defined]
    for _ in range(1000):  # the FIN is on loopback: readable at once, allow a loaded machine 1 s
        if idle_socket.is_readable():
            break
        time.sleep(0.001)
    mock_clock.jump(CHECK_IDLE_AFTER + 0.1)
    assert (await patch(lane)).status == 200
    assert server.connections == 2 and len(requests) == 2
    assert lane.resent == 0  # found dead before use: nothing was written to it


async def test_connection_close_answer_is_not_reused(nursery):
    requests: list[bytes] = []
    answer = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}"
    server = await start(nursery, keepalive(requests, answer))
    lane = lane_for(server.url)
    await patch(lane)
    await patch(lane)
    assert server.connections == 2


async def test_chunked_answer_and_error_answer_with_retry_after(nursery):
    answer = (
        b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 7\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    )
    requests: list[bytes] = []
    server = await start(nursery, keepalive(requests, answer))
    lane = lane_for(server.url)
    resp = await patch(lane)
    assert (resp.status, resp.body, resp.header(b"retry-after")) == (429, b"hello world", "7")
    assert (await patch(lane)).status == 429 and server.connections == 1


async def test_no_answer_within_the_deadline_is_a_timeout_and_the_connection_is_dropped(nursery, mock_clock):
    got = trio.Event()

    async def silent(stream: trio.SocketStream, n: int) -> None:
        if await read_request(stream, bytearray()) is not None:
            got.set()
        await trio.sleep_forever()

    server = await start(nursery, silent)
    lane = lane_for(server.url, timeout=3.0)
    outcome: list[BaseException] = []

    async def call() -> None:
        try:
            await patch(lane)
        except LaneError as exc:
            outcome.append(exc)

    async with trio.open_nursery() as n:
        n.start_soon(call)
        await got.wait()
        mock_clock.jump(2.9)
        await trio.testing.wait_all_tasks_blocked()
        assert not outcome  # not before the deadline
        mock_clock.jump(0.2)
    assert len(outcome) == 1 and isinstance(outcome[0], LaneError) and outcome[0].timeout
    assert lane._idle == []


async def test_cancelled_mid_exchange_the_connection_is_not_reused(nursery):
    got = trio.Event()
    requests: list[bytes] = []

    async def first_silent(stream: trio.SocketStream, n: int) -> None:
        if n == 1:
            await read_request(stream, bytearray())
            got.set()
            await trio.sleep_forever()
        await keepalive(requests)(stream, n)

    server = await start(nursery, first_silent)
    lane = lane_for(server.url)
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as n:
            n.start_soon(patch, lane)
            await got.wait()
            scope.cancel()
    assert scope.cancelled_caught
    assert (await patch(lane)).status == 200  # a new connection, not the half-used one
    assert server.connections == 2 and lane.opened == 2


async def test_an_answer_cut_mid_body_is_an_error_and_is_not_resent(nursery):
    requests: list[bytes] = []

    async def cut(stream: trio.SocketStream, n: int) -> None:
        buf = bytearray()
        req = await read_request(stream, buf)
        assert req is not None
        requests.append(req)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"par")

    server = await start(nursery, cut)
    lane = lane_for(server.url)
    with pytest.raises(LaneError) as info:
        await patch(lane)
    assert not info.value.timeout
    assert len(requests) == 1  # the server may have applied it: no silent second send


async def test_refused_connection_is_a_lane_error(nursery):
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    await listeners[0].aclose()
    lane = lane_for(f"http://127.0.0.1:{port}")
    with pytest.raises(LaneError):
        await patch(lane)


async def test_garbage_answer_is_a_lane_error(nursery):
    server = await start(nursery, keepalive([], b"NOT HTTP AT ALL\r\n\r\n"))
    with pytest.raises(LaneError):
        await patch(lane_for(server.url))


@pytest.fixture
def tls_files(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


async def test_https_with_the_process_tls_context(nursery, tls_files, monkeypatch):
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    requests: list[bytes] = []
    plain = keepalive(requests)
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    tls_listeners = [trio.SSLListener(listener, server_ctx, https_compatible=True) for listener in listeners]

    async def handle(stream) -> None:
        try:
            await plain(stream, 1)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    nursery.start_soon(trio.serve_listeners, handle, tls_listeners)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # as httpx honours it: one TLS configuration
    _, lane = build_client(f"https://127.0.0.1:{port}", connections=2, timeout=5)
    assert lane is not None
    assert (await patch(lane)).status == 200 and (await patch(lane)).status == 200
    assert lane.opened == 1 and len(requests) == 2
    # a certificate the process does not trust is refused
    monkeypatch.delenv("SSL_CERT_FILE")
    _, untrusting = build_client(f"https://127.0.0.1:{port}", connections=2, timeout=5)
    assert untrusting is not None
    with pytest.raises(LaneError):
        await patch(untrusting)


def test_no_lane_when_a_proxy_is_configured(monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    _, lane = build_client("http://api.example.test", connections=2, timeout=5)
    assert lane is None
    monkeypatch.setenv("NO_PROXY", "api.example.test")
    _, lane = build_client("http://api.example.test", connections=2, timeout=5)
    assert lane is not None


# --- the task API over the lane, against the real sandbox --------------------------------


async def make_api(sandbox, tmp_path, *, timeout: float = 5.0, url: str | None = None) -> tuple[TaskApi, TokenProvider]:
    settings = make_settings(sandbox, tmp_path, OAUTH2_AUTH_METHOD=AuthMethod.BASIC.value)
    http, lane = build_client(url or sandbox.url, connections=3, timeout=timeout)
    assert lane is not None
    metrics = Metrics()
    tokens = TokenProvider(http, token_config(settings), metrics=metrics, guard=Guard("token", BreakerConfig()))
    api = TaskApi(http, url or sandbox.url, tokens, metrics=metrics, guard=Guard("api", BreakerConfig()), concurrency=2, lane=lane)
    return api, tokens


async def test_task_api_patches_through_the_lane_and_refreshes_a_revoked_token_once(sandbox, tmp_path):
    st = sandbox.state
    ids = st.seed(3)
    api, tokens = await make_api(sandbox, tmp_path)
    await api.patch(ids[0], "in_progress")
    await api.patch(ids[0], "succeeded", [0.5, 0.25], include_result=True)
    assert st.tasks[ids[0]]["state"] == "succeeded" and st.tasks[ids[0]]["result"] == [0.5, 0.25]
    assert tokens.fetches == 1
    st.revoke_all()
    await api.patch(ids[1], "failed", None, include_result=True, reason="bad content")
    assert st.tasks[ids[1]]["state"] == "failed" and st.patches[-1].body["reason"] == "bad content"
    assert tokens.fetches == 2  # one refresh for the 401, then the request went through
    assert st.requests[("patch", 401)] == 1


async def test_task_api_401_twice_is_an_error_not_a_loop(sandbox, tmp_path):
    st = sandbox.state
    tid = st.seed(1)[0]
    api, tokens = await make_api(sandbox, tmp_path)
    await api.patch(tid, "in_progress")
    st.token_lifetime = -1.0  # every new token is born expired
    st.revoke_all()
    with pytest.raises(ApiError) as info:
        await api.patch(tid, "pending")
    assert info.value.status == 401
    assert st.requests[("patch", 401)] == 2 and tokens.fetches == 2


async def test_task_api_error_answers_become_api_errors(sandbox, tmp_path):
    st = sandbox.state
    api, _ = await make_api(sandbox, tmp_path)
    with pytest.raises(ApiError) as info:
        await api.patch("0" * 24, "in_progress")
    assert (info.value.status, info.value.kind) == (404, ErrorKind.PERMANENT) and "not found" in str(info.value)
    with pytest.raises(ApiError) as info:
        await api.patch("not-an-id/../x", "in_progress")  # quoted: one path segment, 400 from the API
    assert info.value.status == 400
    st.faults["patch"] = Fault(status=503, count=1)
    with pytest.raises(ApiError) as info:
        await api.patch(st.seed(1)[0], "in_progress")
    assert (info.value.status, info.value.kind) == (503, ErrorKind.RETRYABLE)


async def test_task_api_timeout_and_refused_connection_are_api_errors(sandbox, tmp_path, nursery, mock_clock):
    got = trio.Event()

    async def silent(stream: trio.SocketStream, n: int) -> None:
        if await read_request(stream, bytearray()) is not None:
            got.set()
        await trio.sleep_forever()

    server = await start(nursery, silent)
    api, tokens = await make_api(sandbox, tmp_path, timeout=2.0, url=server.url)
    await tokens.get()  # from the sandbox's token endpoint
    errors: list[ApiError] = []

    async def call() -> None:
        try:
            await api.patch("a" * 24, "in_progress")
        except ApiError as exc:
            errors.append(exc)

    async with trio.open_nursery() as n:
        n.start_soon(call)
        await got.wait()
        mock_clock.jump(2.5)
    assert len(errors) == 1
    assert (errors[0].status, errors[0].kind, errors[0].sent) == (None, ErrorKind.RETRYABLE, True)
    assert "Timeout" in str(errors[0])
