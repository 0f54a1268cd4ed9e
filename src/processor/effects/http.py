"""The process's HTTP stack for the task API and the token endpoint.

One stack: httpx, with its protocol engine h11 and one TLS context (`SSL_CERT_FILE` /
`SSL_CERT_DIR` honoured as httpx does). The token client, the OpenAI SDK and the
pending-list stream use `httpx.AsyncClient`; the per-task PATCHes, two per task and
nearly all the requests the daemon makes, go through `Http1Lane`: keep-alive HTTP/1.1
connections driven by h11 directly, with prebuilt header lists and one socket write per
request. Measured against the sandbox (2,000 claim+result pairs, 8 concurrent): 1.29 ms
of CPU per pair through `AsyncClient`, 1.04 through httpx's transport, 0.87 through
httpcore's pool, about 0.30 through the lane (httpcore's pool checks every pooled
connection's socket on each request, and httpx/httpcore wrap each step in models, traces
and context managers).

The lane is used only where it is exact: http or https, no proxy for the host. Because
transports are explicit, httpx does not read proxy variables itself; they are honoured
here (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, `NO_PROXY`): with a proxy, every request
goes through httpx.
"""

from __future__ import annotations

import ssl
import urllib.request
from urllib.parse import urlsplit

import h11
import httpx
import trio

Headers = list[tuple[bytes, bytes]]

KEEPALIVE_EXPIRY = 5.0  # seconds an idle connection is kept (httpx's default)
CHECK_IDLE_AFTER = 0.5  # a connection idle longer than this is checked for a server close before reuse
MAX_RESPONSE_BYTES = 32 * 1024 * 1024  # a PATCH answer is the task: text (10 kB) + result (10 MiB)
READ_SIZE = 64 * 1024


def proxy_for(url: str) -> str | None:
    """The proxy the environment asks for to reach `url` (None: direct). Never raises: a URL
    that cannot be parsed gets no proxy (its requests then fail as the adapter's own error)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError:
        return None
    proxies = urllib.request.getproxies()
    if host and urllib.request.proxy_bypass(host):
        return None
    return proxies.get(parts.scheme) or proxies.get("all")


def ssl_context() -> ssl.SSLContext:
    """The one TLS configuration of the process (httpx's: certifi, or the env's CA file)."""
    return httpx.create_ssl_context(trust_env=True)


def build_client(
    base_url: str, *, connections: int, timeout: float, tls: ssl.SSLContext | None = None
) -> tuple[httpx.AsyncClient, Http1Lane | None]:
    """The httpx client (streams, anything unusual) and the lane for the PATCHes (None when
    the lane cannot be exact for `base_url`: a proxy is configured, or an odd scheme)."""
    tls = tls or ssl_context()
    proxy = proxy_for(base_url)
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    transport = httpx.AsyncHTTPTransport(limits=limits, proxy=proxy, verify=tls, trust_env=True)
    client = httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(timeout), trust_env=True)
    lane = None
    if proxy is None and Http1Lane.supports(base_url):
        lane = Http1Lane(base_url, connections=connections, timeout=timeout, tls=tls)
    return client, lane


class LaneError(Exception):
    """No complete answer came: connection refused or reset, closed mid-answer, a protocol
    or TLS error, an answer too large, or the deadline passed (`timeout`). The server may
    or may not have applied the request."""

    def __init__(self, message: str, *, timeout: bool = False, sent: bool = True) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.sent = sent  # False: refused before anything was written (h11 rejected a header or the target)


class _Stale(Exception):
    """A reused connection was closed by the server before any byte of the answer."""


class LaneResponse:
    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers  # names lower-cased (h11)
        self.body = body

    def header(self, name: bytes) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v.decode("latin-1")
        return None


class _Conn:
    __slots__ = ("stream", "h11", "idle_since", "reused")

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.reused = False


class Http1Lane:
    """Keep-alive HTTP/1.1 connections to one origin for small request/answer exchanges.

    * At most `connections` idle connections are kept; a request with none idle opens one
      (callers bound their own concurrency).
    * One deadline of `timeout` seconds covers the whole exchange (connect, TLS, write,
      answer); past it `LaneError(timeout=True)`.
    * A reused connection that the server closed while idle is found before use (checked
      when idle for more than `CHECK_IDLE_AFTER`), or when it answers nothing at all; the
      request then goes once more on a new connection. Only for idempotent requests: the
      task API's PATCH sets a state unconditionally.
    * A connection whose exchange was cancelled, timed out or broke is closed, never reused.
    """

    def __init__(self, base_url: str, *, connections: int, timeout: float, tls: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(base_url)
        self.scheme = parts.scheme
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/").encode()  # prepended to every target
        self.host_header = parts.netloc.encode("idna") if not parts.netloc.isascii() else parts.netloc.encode()
        self._tls = tls if parts.scheme == "https" else None
        if parts.scheme == "https" and self._tls is None:
            self._tls = ssl_context()
        self._timeout = timeout
        self._max_idle = max(1, connections)
        self._idle: list[_Conn] = []
        self.opened = 0  # connections opened so far (tests, diagnostics)
        self.resent = 0  # requests sent again after a reused connection answered nothing

    @staticmethod
    def supports(base_url: str) -> bool:
        parts = urlsplit(base_url)
        return parts.scheme in ("http", "https") and bool(parts.hostname) and "@" not in parts.netloc and not parts.query

    def base_headers(self) -> list[tuple[bytes, bytes]]:
        return [(b"Host", self.host_header)]

    async def request(self, method: bytes, target: bytes, headers: Headers, body: bytes = b"") -> LaneResponse:
        """Send one request (`headers` must hold Host; Content-Length is added) and read the
        whole answer. Raises LaneError when no complete answer came."""
        deadline = trio.current_time() + self._timeout
        full_target = self.prefix + target
        hdrs = [*headers, (b"Content-Length", str(len(body)).encode())] if body or method not in (b"GET", b"HEAD") else headers
        for _ in range(2):
            conn = self._checkout()
            try:
                with trio.fail_at(deadline):
                    if conn is None:
                        conn = await self._connect()
                    resp = await self._exchange(conn, method, full_target, hdrs, body)
            except _Stale:
                _close(conn)
                self._drop_idle()  # closed while idle: the others of its age likely are too
                self.resent += 1
                continue  # on a new connection
            except trio.TooSlowError:
                _close(conn)
                raise LaneError(f"no answer within {self._timeout:g} s", timeout=True) from None
            except h11.LocalProtocolError:  # its message may quote a header (the token): not repeated
                _close(conn)
                raise LaneError("h11 refused a header or the target", sent=False) from None
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError, h11.RemoteProtocolError) as exc:
                _close(conn)
                raise LaneError(f"{type(exc).__name__}: {exc}"[:200]) from None
            except BaseException:  # cancelled mid-exchange: the connection's state is unknown
                _close(conn)
                raise
            self._checkin(conn)
            return resp
        raise LaneError("server closed the connection without an answer, twice")

    def _checkout(self) -> _Conn | None:
        now = trio.current_time()
        while self._idle:
            conn = self._idle.pop()
            idle = now - conn.idle_since
            if idle > KEEPALIVE_EXPIRY or (idle > CHECK_IDLE_AFTER and _closed_by_peer(conn)):
                _close(conn)
                continue
            return conn
        return None

    def _checkin(self, conn: _Conn) -> None:
        c = conn.h11
        if c.our_state is h11.DONE and c.their_state is h11.DONE and len(self._idle) < self._max_idle:
            c.start_next_cycle()
            conn.reused = True
            conn.idle_since = trio.current_time()
            self._idle.append(conn)
        else:
            _close(conn)

    async def _connect(self) -> _Conn:
        stream: trio.abc.Stream = await trio.open_tcp_stream(self.host, self.port)
        if self._tls is not None:
            tls_stream = trio.SSLStream(stream, self._tls, server_hostname=self.host, https_compatible=True)
            try:
                await tls_stream.do_handshake()
            except BaseException:
                await trio.aclose_forcefully(stream)
                raise
            stream = tls_stream
        self.opened += 1
        return _Conn(stream)

    async def _exchange(self, conn: _Conn, method: bytes, target: bytes, headers: Headers, body: bytes) -> LaneResponse:
        c = conn.h11
        parts = [c.send(h11.Request(method=method, target=target, headers=headers))]
        if body:
            parts.append(c.send(h11.Data(data=body)))
        parts.append(c.send(h11.EndOfMessage()))
        try:
            await conn.stream.send_all(b"".join(p for p in parts if p))
        except (trio.BrokenResourceError, OSError):
            if conn.reused:
                raise _Stale() from None
            raise
        status = 0
        resp_headers: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        size = 0
        got_bytes = False
        while True:
            event = c.next_event()
            if event is h11.NEED_DATA:
                try:
                    chunk = await conn.stream.receive_some(READ_SIZE)
                except (trio.BrokenResourceError, OSError):
                    if conn.reused and not got_bytes:
                        raise _Stale() from None
                    raise
                if not chunk and conn.reused and not got_bytes:
                    raise _Stale()
                got_bytes = True
                c.receive_data(chunk)  # type: ignore[arg-type]  # bytes from a socket stream
                continue
            if isinstance(event, h11.Response):
                status, resp_headers = event.status_code, list(event.headers)
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if size > MAX_RESPONSE_BYTES:
                    raise h11.RemoteProtocolError(f"answer larger than {MAX_RESPONSE_BYTES} bytes")
                chunks.append(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return LaneResponse(status, resp_headers, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):  # pragma: no cover - h11 raises before this for a cut answer
                raise h11.RemoteProtocolError("connection closed before the answer ended")
            # h11.InformationalResponse (1xx): keep reading

    def _drop_idle(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            _close(conn)

    async def aclose(self) -> None:
        self._drop_idle()


def _closed_by_peer(conn: _Conn) -> bool:
    """An idle connection whose socket is readable can only be about to say EOF."""
    stream = conn.stream
    inner = getattr(stream, "transport_stream", stream)
    sock = getattr(inner, "socket", None)
    if sock is None:  # pragma: no cover - every stream the lane opens is a socket
        return False
    try:
        return bool(sock.is_readable())
    except OSError:
        return True


def _close(conn: _Conn | None) -> None:
    """Close at once, without a TLS close_notify: the connection is never used again."""
    if conn is None:
        return
    inner = getattr(conn.stream, "transport_stream", conn.stream)
    sock = getattr(inner, "socket", None)
    if sock is not None:
        sock.close()
