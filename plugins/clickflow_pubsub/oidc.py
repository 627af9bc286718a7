"""Verifies the Google-signed OIDC tokens Pub/Sub attaches to authenticated push requests.

The issuer's signing keys are fetched once and kept; an unknown key id (Google rotates
keys) refetches them, at most every ``refresh_interval``, whether the last fetch worked
or not, so a flood of forged key ids or an unreachable keys endpoint costs one outbound
request per interval. While the keys cannot be had, requests are answered 503, which
Pub/Sub retries, never let through.

Pub/Sub attaches the same token to many pushes (a token may be up to an hour old), and checking
its signature costs about 120 µs of CPU, more than the rest of a push request. So a token that
passed is remembered until its ``exp``: the same token again is accepted by a lookup. Only tokens
that passed are kept (a forged one is checked, and refused, every time), at most
``VERIFIED_TOKENS`` of them, the oldest dropped first. Every other check is the same for the same
token, and time only moves past ``iat``; a token stays valid until ``exp`` even if its key is
rotated out, as it would without the cache.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import aiohttp
import anyio
import jwt

from clickflow_pubsub.push import AuthError

GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")
VERIFIED_TOKENS = 1024
"""Tokens that passed, remembered until they expire; past this many, the oldest is dropped."""

log = logging.getLogger(__name__)


class TokenVerifier:
    """Checks signature (issuer's published keys, cached), ``iss``, ``aud``, ``exp`` and the sender."""

    def __init__(
        self,
        audience: str,
        keys_url: str,
        allowed_emails: list[str] | None = None,
        refresh_interval: float = 30.0,
        fetch_timeout: float = 5.0,
    ) -> None:
        self.audience = audience
        self.keys_url = keys_url
        self.allowed_emails = set(allowed_emails or ())
        self._refresh_interval = refresh_interval
        self._fetch_timeout = fetch_timeout
        self._keys: dict[str, Any] = {}
        self._verified: dict[str, tuple[float, dict[str, Any]]] = {}
        """Tokens that passed, each with its ``exp`` and its claims, oldest first."""
        self._attempted = -float("inf")
        self._fetch_error: str | None = None
        self._lock = anyio.Lock()

    async def _key(self, kid: str, session: aiohttp.ClientSession) -> Any:
        if kid not in self._keys:
            async with self._lock:
                if kid not in self._keys and time.monotonic() - self._attempted > self._refresh_interval:
                    self._attempted = time.monotonic()
                    await self._fetch(session)
        if kid in self._keys:
            return self._keys[kid]
        if self._fetch_error is not None:
            raise AuthError(503, "keys_unavailable", f"signing keys unavailable ({self._fetch_error}); retry later")
        raise AuthError(401, "unknown_key", f"token signed with unknown key {kid!r}")

    async def _fetch(self, session: aiohttp.ClientSession) -> None:
        """Replace the keys with the issuer's; on any failure keep the old ones and say why once."""
        try:
            timeout = aiohttp.ClientTimeout(total=self._fetch_timeout)
            async with session.get(self.keys_url, timeout=timeout) as response:
                response.raise_for_status()
                jwks = await response.json(content_type=None)
            keys = {k["kid"]: jwt.PyJWK(k).key for k in jwks["keys"] if isinstance(k, dict) and "kid" in k}
        except Exception as exc:  # unreachable, slow, 5xx, not JSON, not a key set: all the same here
            self._fetch_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            log.error("cannot fetch token signing keys from %s: %s", self.keys_url, self._fetch_error)
            return
        self._keys, self._fetch_error = keys, None

    async def verify(self, authorization: str | None, session: aiohttp.ClientSession) -> dict[str, Any]:
        if not authorization or not authorization.startswith("Bearer "):
            raise AuthError(401, "missing_token", "missing bearer token")
        token = authorization.removeprefix("Bearer ").strip()
        verified = self._verified.get(token)
        if verified is not None:
            expires, claims = verified
            if time.time() < expires:  # PyJWT's own rule for exp, without leeway
                return claims
            del self._verified[token]
        claims = await self._verify(token, session)
        if len(self._verified) >= VERIFIED_TOKENS:
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (int(claims["exp"]), claims)  # what PyJWT compared
        return claims

    async def _verify(self, token: str, session: aiohttp.ClientSession) -> dict[str, Any]:
        """Every check of a token not seen, or not yet passed; its claims if it passes."""
        try:
            kid = jwt.get_unverified_header(token).get("kid", "")
        except (jwt.PyJWTError, TypeError, ValueError) as exc:
            raise AuthError(401, "malformed_token", f"malformed token: {exc}") from None
        if not isinstance(kid, str):
            raise AuthError(401, "malformed_token", "malformed token: its key id is not text")
        key = await self._key(kid, session)
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=["RS256"], audience=self.audience, issuer=list(GOOGLE_ISSUERS),
                options={"require": ["exp", "iat", "iss", "aud"]},
            )  # fmt: skip
        except jwt.InvalidAudienceError:
            raise AuthError(403, "wrong_audience", "token is for another audience") from None
        except (jwt.PyJWTError, TypeError, ValueError) as exc:  # PyJWT raises TypeError for a list as iss
            raise AuthError(401, "invalid_token", f"invalid token: {exc}") from None
        email = claims.get("email")
        allowed = not self.allowed_emails or (
            isinstance(email, str) and email in self.allowed_emails and claims.get("email_verified") is True
        )
        if not allowed:
            raise AuthError(403, "sender_not_allowed", f"sender {email!r} is not allowed")
        return claims
