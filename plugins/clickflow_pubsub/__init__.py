"""Google Cloud Pub/Sub sources: ``pubsub_pull`` (a subscriber) and ``pubsub_push`` (an endpoint).

Each is registered by import path, so its module (and the GCP client library, imported only when
a pipeline runs) loads only for a pipeline that uses it; clickflow works without the ``gcp`` extra
until then.
"""

from __future__ import annotations

from datetime import timedelta

from clickflow.api import AnySource
from clickflow.hookspecs import Register, hookimpl

PUBSUB_IDS = "a Pub/Sub topic"
"""What Pub/Sub's message ids are unique within (``SourceOptions.ids_unique_within``)."""
MIN_ACK_DEADLINE, MAX_ACK_DEADLINE = timedelta(seconds=10), timedelta(minutes=10)
"""A subscription's acknowledgement deadline, as Pub/Sub bounds it: how long it waits for a pulled
message's acknowledgement, or for a push request's answer."""


@hookimpl
def register_sources(register: Register[AnySource]) -> None:
    register("clickflow_pubsub.pull:PubSubPullSource", "pubsub_pull")
    register("clickflow_pubsub.push:PubSubPushSource", "pubsub_push")
