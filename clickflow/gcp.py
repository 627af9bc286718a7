"""Google credentials, as the Google Cloud plugins get them: through gcloud-aio's ``Token``.

Without a service account key (``service_file``, ``GOOGLE_APPLICATION_CREDENTIALS``) or application
default credentials, gcloud-aio asks the metadata server, which exists only on Google Cloud. Off
it, every call then failed with "Cannot connect to host metadata.google.internal", which does not
say what is missing; a pull source retried it forever. So each plugin fetches a first token as it
starts, and a failure stops the run with what to set. gcloud-aio itself tries a fetch five times
with backoff (about 15 s when the server refuses), which covers a GKE pod whose metadata server is
not ready in its first seconds.
"""

from __future__ import annotations

from typing import Any

import anyio

from clickflow.logs import describe

FIRST_TOKEN_TIMEOUT = 60.0
"""Seconds to get the first token (gcloud-aio's own wait is longer)."""


class NoCredentials(RuntimeError):
    """No access token could be had from the credentials this process finds."""


def token_of(client: Any) -> Any | None:
    """A gcloud-aio client's ``Token``; None when it talks to an emulator, which takes none (the
    client's ``_api_is_dev``: gcloud-aio's own reading of its ``*_EMULATOR_HOST`` variable)."""
    return None if client._api_is_dev else client.token


async def first_token(token: Any | None, emulator_variable: str) -> None:
    """Fetch a first access token from ``token`` (a gcloud-aio ``Token``; None for an emulator, which
    needs none), or raise ``NoCredentials`` naming what to set; ``emulator_variable`` is the variable
    that points the plugin at an emulator."""
    if token is None:
        return
    try:
        with anyio.fail_after(FIRST_TOKEN_TIMEOUT):
            await token.get()
    except Exception as exc:
        raise NoCredentials(
            f"cannot get a Google access token ({describe(exc)}): set GOOGLE_APPLICATION_CREDENTIALS or "
            "service_file to a service account key, run `gcloud auth application-default login`, or run on "
            f"Google Cloud; for an emulator, set {emulator_variable}"
        ) from exc
