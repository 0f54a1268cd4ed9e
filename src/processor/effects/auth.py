"""OAuth2 client-credentials tokens (RFC 6749 §4.4): cached, refreshed before expiry,
one refresh at a time however many requests wait for it."""

from __future__ import annotations

import time
from urllib.parse import quote

import httpx
import trio

from processor.config import AuthMethod, Settings
from processor.effects.guard import BreakerOpen, Guard, outcome_for_status
from processor.effects.logs import REDACTOR, get_logger
from processor.effects.metrics import Metrics
from processor.pure import pacing
from processor.pure.breaker import Outcome

_HINTS = {
    "invalid_client": "check OAUTH2_CLIENT_ID / OAUTH2_CLIENT_SECRET (and OAUTH2_AUTH_METHOD)",
    "unauthorized_client": "the client is not allowed the client_credentials grant; check its settings on the OAuth2 server",
    "invalid_scope": "check OAUTH2_SCOPE against the scopes the client may request",
    "invalid_grant": "check the client's grant types on the OAuth2 server",
    "invalid_request": "the token endpoint rejected the request; check OAUTH2_AUTH_METHOD and OAUTH2_TOKEN_URL",
}


class TokenError(Exception):
    """No token could be obtained. `permanent`: retrying without a config change won't help."""

    def __init__(self, message: str, *, permanent: bool, code: str | None = None) -> None:
        super().__init__(message)
        self.permanent = permanent
        self.code = code


class TokenProvider:
    def __init__(self, http: httpx.AsyncClient, settings: Settings, *, metrics: Metrics, guard: Guard) -> None:
        self._http = http
        self._s = settings
        self._metrics = metrics
        self.guard = guard
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = trio.Lock()
        self.last_error: str | None = None
        self.obtained_wall: float | None = None
        self.fetches = 0
        self._permanent_failures = 0
        self._not_before = 0.0  # after a rejected request: no new attempt before this
        self._last_exc: TokenError | None = None
        self._log = get_logger("auth")
        REDACTOR.add(settings.oauth2_client_secret)

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
            if self._last_exc is not None and trio.current_time() < self._not_before:
                raise self._last_exc  # credentials were rejected: back off, no hot loop
            try:
                return await self._fetch()
            except TokenError as exc:
                if exc.permanent:
                    self._permanent_failures += 1
                    self._not_before = trio.current_time() + min(60.0, 2.0 ** (self._permanent_failures - 1))
                    self._last_exc = exc
                raise

    def invalidate(self, token: str) -> None:
        """The API said 401 for `token`: drop it, unless a newer one already replaced it."""
        if self._token == token:
            self._token = None

    async def _fetch(self) -> str:
        s = self._s
        try:
            self.guard.check()
        except BreakerOpen:
            raise TokenError(f"token endpoint: circuit open after failures ({self.last_error})", permanent=False) from None
        data = {"grant_type": "client_credentials"}
        if s.oauth2_scope:
            data["scope"] = s.oauth2_scope
        auth: httpx.Auth | httpx._client.UseClientDefault = httpx.USE_CLIENT_DEFAULT
        if s.oauth2_auth_method is AuthMethod.BASIC:
            # RFC 6749 §2.3.1: id and secret are form-urlencoded before Basic encoding
            auth = httpx.BasicAuth(quote(s.oauth2_client_id, safe=""), quote(s.oauth2_client_secret, safe=""))
        else:
            data.update(client_id=s.oauth2_client_id, client_secret=s.oauth2_client_secret)
        self.fetches += 1
        try:
            resp = await self._http.post(s.oauth2_token_url, data=data, auth=auth, headers={"Accept": "application/json"})
        except httpx.HTTPError as exc:
            self.guard.record(Outcome.FAILURE)
            self._metrics.token_fetches.labels("error").inc()
            self.last_error = f"token endpoint unreachable: {type(exc).__name__}"
            raise TokenError(f"{self.last_error} ({s.oauth2_token_url})", permanent=False) from None
        self.guard.record(outcome_for_status(resp.status_code))
        if resp.status_code != 200:
            self._metrics.token_fetches.labels("error").inc()
            code, desc = _error_fields(resp)
            hint = _HINTS.get(code or "", "")
            if resp.status_code == 404:
                hint = "check OAUTH2_TOKEN_URL / ORY_PROJECT_SLUG"
            permanent = resp.status_code in (400, 401, 403, 404)
            self.last_error = f"token endpoint: {code or f'HTTP {resp.status_code}'}" + (f" — {hint}" if hint else "")
            self._log.error("token_request_failed", status=resp.status_code, error=code, description=desc, hint=hint or None)
            raise TokenError(self.last_error, permanent=permanent, code=code)
        try:
            body = resp.json()
            token = body["access_token"]
            if not isinstance(token, str) or not token:
                raise ValueError("empty access_token")
            if str(body.get("token_type", "bearer")).lower() != "bearer":
                raise ValueError(f"token_type {body.get('token_type')!r} is not bearer")
            expires_in = body.get("expires_in")
            expires_in = float(expires_in) if isinstance(expires_in, (int, float)) else None
        except (ValueError, KeyError, TypeError) as exc:
            self._metrics.token_fetches.labels("error").inc()
            self.last_error = f"token endpoint returned an unusable answer: {exc}"
            raise TokenError(self.last_error, permanent=False) from None
        REDACTOR.add(token)
        self._token = token
        self._refresh_at = pacing.token_refresh_at(trio.current_time(), expires_in)
        self.obtained_wall = time.time()
        self.last_error = None
        self._last_exc = None
        self._permanent_failures = 0
        self._metrics.token_fetches.labels("success").inc()
        self._log.info("token_obtained", expires_in=expires_in)
        return token


def _error_fields(resp: httpx.Response) -> tuple[str | None, str | None]:
    try:
        body = resp.json()
    except ValueError:
        return None, None
    if not isinstance(body, dict):
        return None, None
    code = body.get("error")
    desc = body.get("error_description")
    return (code if isinstance(code, str) else None), (str(desc)[:200] if desc else None)
