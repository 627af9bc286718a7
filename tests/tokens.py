"""Push tokens as Pub/Sub signs them, and the key set a keys endpoint serves: for the push tests,
and for `bench/bench_push.py`, whose wrk requests carry a token signed by a key of its own."""

from __future__ import annotations

import time
from typing import Any

import jwt

AUDIENCE = "https://clickflow.example.com/pubsub/push"
SENDER = "pusher@project.iam.gserviceaccount.com"


def token(key: Any, **claims: Any) -> str:
    """A token from Google for ``SENDER`` and ``AUDIENCE``, valid for ten minutes, signed by
    ``key`` as ``k1``; ``claims`` are added or replace those."""
    now = int(time.time())
    payload = {"iss": "https://accounts.google.com", "aud": AUDIENCE, "iat": now, "exp": now + 600,
               "email": SENDER, "email_verified": True, **claims}  # fmt: skip
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k1"})


def key_set(key: Any) -> dict[str, Any]:
    """The JSON key set a keys endpoint serves, holding ``key``'s public half as ``k1``."""
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {"keys": [{**jwk, "kid": "k1", "alg": "RS256"}]}
