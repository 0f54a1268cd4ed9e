"""OAuth2 client-credentials tokens (RFC 6749 §4.4): cached, refreshed before expiry,
one refresh at a time however many requests wait for it.

Nothing foreign gets out of `TokenProvider.get`: every failure is a `TokenError` with a
`fault`. An answer that is unusable (not JSON, no token, a token that is not visible ASCII
and so cannot go into an `Authorization` header) backs off like a rejected request.
`expires_in` is trusted only when it is a plain positive number (or a string of digits);
anything else (NaN, infinity, negative, under a second, a bool, text) counts as missing, and
a lifetime is capped at `MAX_TOKEN_LIFETIME`.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any
from urllib.parse import quote

import attrs
import httpx
import trio

from processor.config import AuthMethod
from processor.effects.guard import BreakerOpen, Guard, outcome_for_status
from processor.effects.logs import REDACTOR, get_logger
from processor.effects.metrics import Metrics
from processor.pure import pacing
from processor.pure.breaker import Outcome
from processor.pure.faults import Dependency, Fault
from processor.pure.jsonstream import printable

# Longest lifetime believed: past it a token is replaced anyway (one request a day is cheap).
MAX_TOKEN_LIFETIME = 86_400.0
# Shorter is not a lifetime to plan by (a refresh per request): treated as missing.
MIN_TOKEN_LIFETIME = 1.0
MAX_TOKEN_CHARS = 16_384
_VISIBLE_ASCII = re.compile(r"[\x21-\x7e]+")
_DIGITS = re.compile(r"[0-9]{1,9}")

_HINTS = {
    "invalid_client": "check OAUTH2_CLIENT_ID / OAUTH2_CLIENT_SECRET (and OAUTH2_AUTH_METHOD)",
    "unauthorized_client": "the client is not allowed the client_credentials grant; check its settings on the OAuth2 server",
    "invalid_scope": "check OAUTH2_SCOPE against the scopes the client may request",
    "invalid_grant": "check the client's grant types on the OAuth2 server",
    "invalid_request": "the token endpoint rejected the request; check OAUTH2_AUTH_METHOD and OAUTH2_TOKEN_URL",
}


class TokenError(Exception):
    """No token could be obtained. `permanent`: retrying without a config change won't help.
    `fault`: AUTH (credentials or request refused), MALFORMED (an unusable 200),
    UNREACHABLE, TIMEOUT, SERVER, BUSY."""

    dependency = Dependency.TOKEN

    def __init__(self, message: str, *, permanent: bool, code: str | None = None, fault: Fault | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.code = code
        self.fault = fault if fault is not None else (Fault.AUTH if permanent else Fault.UNREACHABLE)


def expires_in_seconds(value: Any) -> float | None:
    """A usable `expires_in`, or None (missing, or not a sane number): never raises."""
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int):
        return float(min(value, int(MAX_TOKEN_LIFETIME))) if value >= MIN_TOKEN_LIFETIME else None
    if not math.isfinite(value) or value < MIN_TOKEN_LIFETIME:
        return None
    return min(value, MAX_TOKEN_LIFETIME)


def token_problem(token: Any) -> str | None:
    """None if `token` can be sent as a bearer token, else why not (without the token)."""
    if not isinstance(token, str) or not token:
        return "no access_token (or not a string)"
    if len(token) > MAX_TOKEN_CHARS:
        return f"access_token is {len(token)} characters long (over {MAX_TOKEN_CHARS})"
    if not _VISIBLE_ASCII.fullmatch(token):
        return "access_token has characters that cannot go into an HTTP header (non-ASCII, spaces or control characters)"
    return None


@attrs.frozen
class TokenConfig:
    """What the OAuth2 client needs of the settings (built by `processor.wiring`)."""

    token_url: str
    client_id: str
    client_secret: str = attrs.field(repr=False)
    scope: str = ""
    auth_method: AuthMethod = AuthMethod.BASIC


@attrs.define
class RejectionBackoff:
    """After rejected credentials or an unusable answer: no new request for 1, 2, 4 … 60 s
    (the same error again meanwhile), so a wrong secret never makes a hot loop."""

    failures: int = 0
    not_before: float = 0.0
    last: TokenError | None = None

    def pending(self, now: float) -> TokenError | None:
        """The error to raise again instead of asking, while the back-off lasts."""
        return self.last if self.last is not None and now < self.not_before else None

    def rejected(self, exc: TokenError, now: float) -> None:
        self.failures += 1
        self.not_before = now + min(60.0, 2.0 ** min(self.failures - 1, 10))
        self.last = exc

    def clear(self) -> None:
        self.failures, self.last = 0, None


class TokenEndpoint:
    """The token endpoint client: one client-credentials request (RFC 6749 §4.4), its answer
    checked and classified (`TokenError`), under the endpoint's breaker."""

    def __init__(self, http: httpx.AsyncClient, config: TokenConfig, *, metrics: Metrics, guard: Guard) -> None:
        self._http = http
        self._config = config
        self._metrics = metrics
        self.guard = guard
        self.last_error: str | None = None
        self.fetches = 0
        self._log = get_logger("auth")

    async def fetch(self) -> tuple[str, float | None]:
        """(token, expires_in) or TokenError."""
        c = self._config
        try:
            self.guard.check()
        except BreakerOpen:
            raise TokenError(f"token endpoint: circuit open after failures ({self.last_error})", permanent=False) from None
        data = {"grant_type": "client_credentials"}
        if c.scope:
            data["scope"] = c.scope
        auth: httpx.Auth | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT
        if c.auth_method is AuthMethod.BASIC:
            # RFC 6749 §2.3.1: id and secret are form-urlencoded before Basic encoding
            auth = httpx.BasicAuth(quote(c.client_id, safe=""), quote(c.client_secret, safe=""))
        else:
            data.update(client_id=c.client_id, client_secret=c.client_secret)
        self.fetches += 1
        try:
            resp = await self._http.post(c.token_url, data=data, auth=auth, headers={"Accept": "application/json"})
            await resp.aread()
        except Exception as exc:  # httpx errors, an unusable URL, ...
            self.guard.record(Outcome.FAILURE)
            self._metrics.token_fetches.labels("error").inc()
            self.last_error = f"token endpoint unreachable: {type(exc).__name__}"
            fault = Fault.TIMEOUT if isinstance(exc, httpx.TimeoutException) else Fault.UNREACHABLE
            raise TokenError(f"{self.last_error} ({printable(c.token_url, 200)})", permanent=False, fault=fault) from None
        if resp.status_code != 200:
            raise self._refused(resp)
        token, expires_in, problem = _parse_token_answer(resp)
        if problem is not None or token is None:
            self.guard.record(Outcome.FAILURE)
            self._metrics.token_fetches.labels("error").inc()
            self.last_error = f"token endpoint returned an unusable answer: {problem}"
            self._log.error("token_answer_unusable", problem=problem)
            raise TokenError(self.last_error, permanent=False, fault=Fault.MALFORMED)
        self.guard.record(Outcome.SUCCESS)
        self.last_error = None
        self._metrics.token_fetches.labels("success").inc()
        return token, expires_in

    def _refused(self, resp: httpx.Response) -> TokenError:
        self.guard.record(outcome_for_status(resp.status_code))
        self._metrics.token_fetches.labels("error").inc()
        code, desc = _error_fields(resp)
        hint = _HINTS.get(code or "", "")
        if resp.status_code == 404:
            hint = "check OAUTH2_TOKEN_URL / ORY_PROJECT_SLUG"
        permanent = resp.status_code in (400, 401, 403, 404)
        fault = Fault.AUTH if permanent else Fault.BUSY if resp.status_code == 503 else Fault.SERVER
        self.last_error = f"token endpoint: {code or f'HTTP {resp.status_code}'}" + (f" — {hint}" if hint else "")
        self._log.error("token_request_failed", status=resp.status_code, error=code, description=desc, hint=hint or None)
        return TokenError(self.last_error, permanent=permanent, code=code, fault=fault)


class TokenProvider:
    """The token cache over `TokenEndpoint`: one token, refreshed before it expires
    (`pacing.token_refresh_at`), one fetch at a time, a `RejectionBackoff`."""

    def __init__(self, http: httpx.AsyncClient, config: TokenConfig, *, metrics: Metrics, guard: Guard) -> None:
        self._endpoint = TokenEndpoint(http, config, metrics=metrics, guard=guard)
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = trio.Lock()
        self.obtained_wall: float | None = None
        self._backoff = RejectionBackoff()
        self._log = get_logger("auth")
        REDACTOR.add(config.client_secret)
        self._secret_name = f"access_token {config.token_url} {config.client_id}"

    @property
    def guard(self) -> Guard:
        return self._endpoint.guard

    @property
    def last_error(self) -> str | None:
        return self._endpoint.last_error

    @property
    def fetches(self) -> int:
        """Requests sent to the token endpoint (statistics)."""
        return self._endpoint.fetches

    @property
    def has_token(self) -> bool:
        return self._token is not None

    async def get(self) -> str:
        """A valid token, fetching one if needed (one fetch at a time)."""
        tok = self._token
        if tok is not None and trio.current_time() < self._refresh_at:
            return tok
        async with self._lock:
            if self._token is not None and trio.current_time() < self._refresh_at:
                return self._token
            pending = self._backoff.pending(trio.current_time())
            if pending is not None:
                raise pending  # credentials rejected or answer unusable: back off, no hot loop
            try:
                return await self._fetch()
            except TokenError as exc:
                if exc.permanent or exc.fault is Fault.MALFORMED:
                    self._backoff.rejected(exc, trio.current_time())
                raise
            except Exception as exc:  # never let a foreign exception out
                self._endpoint.last_error = f"token request failed: {type(exc).__name__}"
                raise TokenError(self._endpoint.last_error, permanent=False, fault=Fault.UNREACHABLE) from None

    def invalidate(self, token: str) -> None:
        """The API said 401 for `token`: drop it, unless a newer one already replaced it."""
        if self._token == token:
            self._token = None

    async def _fetch(self) -> str:
        token, expires_in = await self._endpoint.fetch()
        REDACTOR.rotate(self._secret_name, token)
        self._token = token
        self._refresh_at = pacing.token_refresh_at(trio.current_time(), expires_in)
        self.obtained_wall = time.time()
        self._backoff.clear()
        self._log.info("token_obtained", expires_in=expires_in)
        return token


def _parse_token_answer(resp: httpx.Response) -> tuple[str | None, float | None, str | None]:
    """(token, expires_in, problem) from a 200 answer; never raises."""
    try:
        body = resp.json()
    except (ValueError, RecursionError):
        return None, None, f"not JSON (content-type {printable(resp.headers.get('content-type', 'none'), 60)!r})"
    if not isinstance(body, dict):
        return None, None, f"a JSON {type(body).__name__}, not an object"
    token = body.get("access_token")
    problem = token_problem(token)
    if problem is not None:
        return None, None, problem
    token_type = body.get("token_type", "bearer")
    if not isinstance(token_type, str) or token_type.lower() != "bearer":
        shown = printable(token_type, 40) if isinstance(token_type, str) else type(token_type).__name__
        return None, None, f"token_type {shown!r} is not bearer"
    return token, expires_in_seconds(body.get("expires_in")), None


def _error_fields(resp: httpx.Response) -> tuple[str | None, str | None]:
    try:
        body = resp.json()
    except (ValueError, RecursionError):
        return None, None
    if not isinstance(body, dict):
        return None, None
    code = body.get("error")
    desc = body.get("error_description")
    return (printable(code, 100) if isinstance(code, str) else None), (printable(desc, 200) if isinstance(desc, str) else None)
