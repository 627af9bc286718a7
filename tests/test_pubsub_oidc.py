"""The push endpoint's token checks: a token that passed is remembered until it expires, and only
such tokens are; every other is checked, and refused, each time it comes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jwt
import pytest
import pytest_asyncio
from aiohttp import web

from clickflow_pubsub import oidc
from clickflow_pubsub.oidc import AuthError, TokenVerifier
from tests.test_pubsub_push import keys
from tests.test_pubsub_push_hostile import keys_server
from tests.tokens import AUDIENCE, SENDER, key_set, token

__all__ = ["keys"]  # a fixture, used by name


def bearer(key: Any, **claims: Any) -> str:
    return f"Bearer {token(key, **claims)}"


@pytest_asyncio.fixture
async def verifier(
    aiohttp_server: Any, keys: dict[str, Any]
) -> AsyncIterator[tuple[TokenVerifier, aiohttp.ClientSession]]:
    """A verifier of the tokens ``keys["google"]`` signs, its keys served over HTTP."""
    served = keys_server(aiohttp_server, lambda: web.json_response(key_set(keys["google"])))
    async with served as (url, _), aiohttp.ClientSession() as session:
        yield TokenVerifier(AUDIENCE, url, [SENDER]), session


@pytest.fixture
def checked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every token whose signature PyJWT checks, in order."""
    tokens: list[str] = []
    decode = jwt.decode

    def counted(token: str, *args: Any, **kwargs: Any) -> Any:
        tokens.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counted)
    return tokens


@pytest.mark.asyncio
async def test_a_token_that_passed_is_checked_once(
    verifier: tuple[TokenVerifier, aiohttp.ClientSession], keys: dict[str, Any], checked: list[str]
) -> None:
    tokens, session = verifier
    authorization = bearer(keys["google"])
    claims = [await tokens.verify(authorization, session) for _ in range(5)]
    assert all(c == claims[0] for c in claims) and claims[0]["email"] == SENDER
    assert checked == [authorization.removeprefix("Bearer ")]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("signer", "claims", "status", "code"),
    [
        ("forger", {}, 401, "invalid_token"),
        ("google", {"aud": "https://elsewhere.example.com"}, 403, "wrong_audience"),
        ("google", {"email": "someone@else.example.com"}, 403, "sender_not_allowed"),
    ],
)
async def test_a_refused_token_is_checked_and_refused_every_time(
    verifier: tuple[TokenVerifier, aiohttp.ClientSession],
    keys: dict[str, Any],
    checked: list[str],
    signer: str,
    claims: dict[str, Any],
    status: int,
    code: str,
) -> None:
    tokens, session = verifier
    authorization = bearer(keys[signer], **claims)
    for _ in range(3):
        with pytest.raises(AuthError) as refused:
            await tokens.verify(authorization, session)
        assert (refused.value.status, refused.value.code) == (status, code)
    assert len(checked) == 3


@pytest.mark.asyncio
async def test_a_remembered_token_is_refused_once_it_expires(
    verifier: tuple[TokenVerifier, aiohttp.ClientSession], keys: dict[str, Any], checked: list[str]
) -> None:
    tokens, session = verifier
    expires = int(time.time()) + 2
    authorization = bearer(keys["google"], exp=expires)
    await tokens.verify(authorization, session)
    await tokens.verify(authorization, session)
    assert len(checked) == 1
    await asyncio.sleep(max(0.0, expires - time.time()) + 0.05)
    with pytest.raises(AuthError) as refused:
        await tokens.verify(authorization, session)
    assert (refused.value.status, refused.value.code) == (401, "invalid_token")
    assert "expired" in str(refused.value)
    assert len(checked) == 2


@pytest.mark.asyncio
async def test_the_remembered_tokens_are_bounded_the_oldest_dropped_first(
    verifier: tuple[TokenVerifier, aiohttp.ClientSession],
    keys: dict[str, Any],
    checked: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(oidc, "VERIFIED_TOKENS", 3)
    tokens, session = verifier
    authorizations = [bearer(keys["google"], sub=str(n)) for n in range(5)]
    for authorization in authorizations:
        await tokens.verify(authorization, session)
    assert len(checked) == 5
    await tokens.verify(authorizations[-1], session)  # among the three kept
    assert len(checked) == 5
    await tokens.verify(authorizations[0], session)  # dropped: checked again
    assert len(checked) == 6
