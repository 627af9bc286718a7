"""Google Cloud Pub/Sub sources: ``pubsub_pull`` (a subscriber) and ``pubsub_push`` (an endpoint).

The GCP client library is imported only when a pipeline uses these sources,
so clickflow works without the ``gcp`` extra until then.
"""

from __future__ import annotations

from collections.abc import Callable

from clickflow.api import AnySource
from clickflow.hookspecs import hookimpl
from clickflow_pubsub.pull import PubSubPullSource
from clickflow_pubsub.push import PubSubPushSource

__all__ = ["PubSubPullSource", "PubSubPushSource"]


@hookimpl
def register_sources(register: Callable[[type[AnySource]], None]) -> None:
    register(PubSubPullSource)
    register(PubSubPushSource)
