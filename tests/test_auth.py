"""The OAuth2 client against the sandbox server and against servers that differ in detail."""

from __future__ import annotations

import httpx
import pytest
import respx
import trio

from processor.effects.auth import TokenError, TokenProvider
from processor.effects.guard import Guard
from processor.effects.metrics import Metrics
from processor.pure.breaker import BreakerConfig
from tests.conftest import make_settings


def provider(http, settings) -> TokenProvider:
    return TokenProvider(http, settings, metrics=Metrics(), guard=Guard("token", BreakerConfig()))


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
