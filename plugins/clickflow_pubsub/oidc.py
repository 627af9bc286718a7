"""Verifies the Google-signed OIDC tokens Pub/Sub attaches to authenticated push requests."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import anyio
import jwt

GOOGLE_ISSUERS = ("https://accounts.google.com", "accounts.google.com")


class AuthError(Exception):
    """The request is refused: ``status`` is 401 (who are you?) or 403 (not you)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class TokenVerifier:
    """Checks signature (issuer's published keys, cached), ``iss``, ``aud``, ``exp`` and the sender."""

    def __init__(
        self,
        audience: str,
        keys_url: str,
        allowed_emails: list[str] | None = None,
        refresh_interval: float = 30.0,
    ) -> None:
        self.audience = audience
        self.keys_url = keys_url
        self.allowed_emails = set(allowed_emails or ())
        self._refresh_interval = refresh_interval
        self._keys: dict[str, Any] = {}
        self._fetched = 0.0
        self._lock = anyio.Lock()

    async def _key(self, kid: str, session: aiohttp.ClientSession) -> Any:
        if kid not in self._keys:
            async with self._lock:  # refresh on an unknown key id, at most every refresh_interval
                if kid not in self._keys and time.monotonic() - self._fetched > self._refresh_interval:
                    async with session.get(self.keys_url) as response:
                        response.raise_for_status()
                        jwks = await response.json(content_type=None)
                    self._keys = {k["kid"]: jwt.PyJWK(k).key for k in jwks.get("keys", []) if "kid" in k}
                    self._fetched = time.monotonic()
        if kid not in self._keys:
            raise AuthError(401, f"token signed with unknown key {kid!r}")
        return self._keys[kid]

    async def verify(self, authorization: str | None, session: aiohttp.ClientSession) -> dict[str, Any]:
        if not authorization or not authorization.startswith("Bearer "):
            raise AuthError(401, "missing bearer token")
        token = authorization.removeprefix("Bearer ").strip()
        try:
            kid = jwt.get_unverified_header(token).get("kid", "")
        except jwt.PyJWTError as exc:
            raise AuthError(401, f"malformed token: {exc}") from None
        key = await self._key(kid, session)
        try:
            claims: dict[str, Any] = jwt.decode(
                token, key, algorithms=["RS256"], audience=self.audience, issuer=list(GOOGLE_ISSUERS),
                options={"require": ["exp", "iat", "iss", "aud"]},
            )  # fmt: skip
        except jwt.InvalidAudienceError:
            raise AuthError(403, "token is for another audience") from None
        except jwt.PyJWTError as exc:
            raise AuthError(401, f"invalid token: {exc}") from None
        allowed = not self.allowed_emails or (
            claims.get("email") in self.allowed_emails and claims.get("email_verified") is True
        )
        if not allowed:
            raise AuthError(403, f"sender {claims.get('email')!r} is not allowed")
        return claims
