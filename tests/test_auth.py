"""The OAuth2 client against the sandbox server and against servers that differ in detail."""

from __future__ import annotations

import io
import itertools

import httpx
import orjson
import pytest
import respx
import trio

from processor.effects.api import ApiError, TaskApi
from processor.effects.auth import TokenError, TokenProvider, expires_in_seconds
from processor.effects.guard import Guard
from processor.effects.logs import REDACTOR, configure_logging, get_logger
from processor.effects.metrics import Metrics
from processor.pure.breaker import BreakerConfig
from processor.wiring import token_config
from tests.conftest import make_settings


def provider(http, settings) -> TokenProvider:
    return TokenProvider(http, token_config(settings), metrics=Metrics(), guard=Guard("token", BreakerConfig()))


@pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
async def test_both_auth_methods_with_a_secret_that_needs_encoding(sandbox, tmp_path, method):
    sandbox.state.client_secret = "s3cr+t/with:odd%chars and space"
    settings = make_settings(sandbox, tmp_path, OAUTH2_AUTH_METHOD=method)
    async with httpx.AsyncClient() as http:
        tokens = provider(http, settings)
        tok = await tokens.get()
        assert tok.startswith("sbx_") and await tokens.get() == tok  # cached
    assert sandbox.state.token_requests == 1


async def test_concurrent_callers_share_one_fetch(sandbox, tmp_path):
    settings = make_settings(sandbox, tmp_path)
    async with httpx.AsyncClient() as http:
        tokens = provider(http, settings)
        got = []

        async def one():
            got.append(await tokens.get())

        async with trio.open_nursery() as n:
            for _ in range(50):
                n.start_soon(one)
        assert len(set(got)) == 1 and sandbox.state.token_requests == 1
        tokens.invalidate("some-older-token")  # a 401 for a token already replaced: no refetch
        assert await tokens.get() == got[0]
        tokens.invalidate(got[0])
        assert await tokens.get() != got[0] and sandbox.state.token_requests == 2


@respx.mock
async def test_servers_that_differ_in_detail(sandbox, tmp_path):
    settings = make_settings(sandbox, tmp_path, OAUTH2_TOKEN_URL="https://auth.example.test/oauth2/token")
    # "Bearer" capitalised, no expires_in, a JWT-looking token: all fine, treated as opaque
    respx.post("https://auth.example.test/oauth2/token").mock(return_value=httpx.Response(
        200, json={"access_token": "eyJhbGciOi.eyJzdWIiOi.sig", "token_type": "Bearer"}))
    async with httpx.AsyncClient() as http:
        tokens = provider(http, settings)
        assert await tokens.get() == "eyJhbGciOi.eyJzdWIiOi.sig"
    respx.post("https://auth.example.test/oauth2/token").mock(return_value=httpx.Response(
        400, json={"error": "invalid_scope", "error_description": "The requested scope is invalid"}))
    async with httpx.AsyncClient() as http:
        tokens = provider(http, settings)
        with pytest.raises(TokenError) as info:
            await tokens.get()
    assert info.value.permanent and "invalid_scope" in str(info.value) and "OAUTH2_SCOPE" in str(info.value)
    respx.post("https://auth.example.test/oauth2/token").mock(return_value=httpx.Response(503, text="busy"))
    async with httpx.AsyncClient() as http:
        with pytest.raises(TokenError) as info:
            await provider(http, settings).get()
    assert not info.value.permanent


# --- answers a token endpoint can legally (or nearly) give (issue 11) -----------------

TOKEN_URL = "https://auth.example.test/oauth2/token"


def token_answer(expires_in: bytes, token: bytes = b'"tok-1234"') -> bytes:
    return b'{"access_token": %s, "token_type": "bearer", "expires_in": %s}' % (token, expires_in)


@pytest.mark.parametrize("expires_in", [b"NaN", b"Infinity", b"-Infinity", b"-5", b"0", b"1e300", b"1" + b"0" * 40,
                                        b'"soon"', b'"3600x"', b"true", b"null", b"[]", b"{}", b"0.000001"])
@respx.mock
async def test_an_absurd_expires_in_gives_a_sane_lifetime(sandbox, tmp_path, autojump_clock, expires_in):
    """Treated as missing (a conservative default) or capped: one token request per lifetime,
    never one per API request, and never a token kept for ever."""
    route = respx.post(TOKEN_URL).mock(return_value=httpx.Response(200, content=token_answer(expires_in)))
    settings = make_settings(sandbox, tmp_path, OAUTH2_TOKEN_URL=TOKEN_URL)
    async with httpx.AsyncClient() as http:
        tokens = provider(http, settings)
        for _ in range(20):
            assert await tokens.get() == "tok-1234"
        assert route.call_count == 1
        await trio.sleep(86_400 + 1)  # the virtual clock: past the longest lifetime believed
        await tokens.get()
        assert route.call_count == 2


@pytest.mark.parametrize("expires_in,lifetime", [(b'"3599"', 3599.0), (b"120", 120.0), (b"1e9", 86_400.0)])
async def test_plain_lifetimes_are_believed_up_to_a_day(expires_in, lifetime):
    assert expires_in_seconds(orjson.loads(expires_in)) == lifetime


@pytest.mark.parametrize("token", [b'"t\\u00f6k"', b'"tok\\nX-Evil: 1"', b'"tok en"', b'"\\u0000abc"', b'"\\udc00abc"',
                                   b'"' + b"x" * 20_000 + b'"', b'""', b"123", b"null"])
@respx.mock
async def test_an_unusable_access_token_is_a_token_error_and_backs_off(sandbox, tmp_path, autojump_clock, token):
    route = respx.post(TOKEN_URL).mock(return_value=httpx.Response(200, content=token_answer(b"3600", token)))
    settings = make_settings(sandbox, tmp_path, OAUTH2_TOKEN_URL=TOKEN_URL)
    async with httpx.AsyncClient() as http:
        tokens = provider(http, settings)
        with pytest.raises(TokenError) as info:
            await tokens.get()
        assert not info.value.permanent and info.value.fault.value == "malformed"
        assert "unusable" in str(info.value)
        with pytest.raises(TokenError):
            await tokens.get()  # backing off: no second request at once
        assert route.call_count == 1
        await trio.sleep(2)
        with pytest.raises(TokenError):
            await tokens.get()
        assert route.call_count == 2


@pytest.mark.parametrize("body", [b"<html>Service Unavailable</html>", b"[1, 2]", b'"a string"', b"[" * 100_000,
                                  b'{"access_token": {"nested": true}}', b"\xff\xfe{}", b'{"access_token": "tok-1234", "token_type": 5}'])
@respx.mock
async def test_whatever_a_200_holds_no_foreign_exception_gets_out(sandbox, tmp_path, body):
    respx.post(TOKEN_URL).mock(return_value=httpx.Response(200, content=body))
    settings = make_settings(sandbox, tmp_path, OAUTH2_TOKEN_URL=TOKEN_URL)
    async with httpx.AsyncClient() as http:
        with pytest.raises(TokenError) as info:
            await provider(http, settings).get()
    assert info.value.fault.value == "malformed"


@respx.mock
async def test_an_unusable_token_never_reaches_a_header(sandbox, tmp_path):
    """Through the API client: its own ApiError, never UnicodeEncodeError."""
    respx.post(TOKEN_URL).mock(return_value=httpx.Response(200, content=token_answer(b"3600", b'"t\\u00f6k"')))
    respx.get(f"{sandbox.url}/api/ai-tasks/pending").pass_through()
    settings = make_settings(sandbox, tmp_path, OAUTH2_TOKEN_URL=TOKEN_URL)
    async with httpx.AsyncClient() as http:
        api = TaskApi(http, settings.api_base_url, provider(http, settings), metrics=Metrics(),
                      guard=Guard("api", BreakerConfig()), concurrency=2)
        with pytest.raises(ApiError) as info:
            async with api.pending() as entries:
                [e async for e in entries]
        assert not info.value.sent


@respx.mock
async def test_the_redactor_keeps_only_live_tokens(sandbox, tmp_path):
    """Many refreshes: the redactor does not grow, and the current token is still redacted."""
    counter = itertools.count()

    def issue(request):
        return httpx.Response(200, json={"access_token": f"tok-{next(counter):06d}-secret", "token_type": "bearer", "expires_in": 3600})

    respx.post(TOKEN_URL).mock(side_effect=issue)
    settings = make_settings(sandbox, tmp_path, OAUTH2_TOKEN_URL=TOKEN_URL)
    async with httpx.AsyncClient() as http:
        tokens = provider(http, settings)
        first = await tokens.get()
        size = len(REDACTOR)
        previous = current = first
        for _ in range(1000):
            tokens.invalidate(current)
            previous, current = current, await tokens.get()
        assert len(REDACTOR) <= size + 1  # the ring holds the current and the previous one
        scraped = Metrics().registry.get_sample_value("processor_redactor_secrets")
        assert scraped == len(REDACTOR) <= size + 1  # exposed as a count (issue 11's soak prints it)
        out = io.StringIO()
        configure_logging("INFO", "json", stream=out)
        try:
            get_logger("test").warning("echo", text=f"sent {current} and {previous} with {settings.oauth2_client_secret}")
        finally:
            configure_logging("WARNING", "json")
    line = out.getvalue()
    assert '"echo"' in line and "[REDACTED]" in line
    assert current not in line and previous not in line and settings.oauth2_client_secret not in line
    assert first not in REDACTOR._all  # long replaced: forgotten
