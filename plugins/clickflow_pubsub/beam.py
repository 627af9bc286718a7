"""The ``pubsub_pull`` source on Beam: Beam's own Pub/Sub read, in streaming mode.

Messages keep their Pub/Sub message id, as in the async runtime, so row ids
agree between the two. Dataflow acknowledges a message once its bundle is
committed and removes duplicates by message id. Beam's connector cannot use
the Pub/Sub emulator, so this runs against Google Cloud only.
"""

from __future__ import annotations

import apache_beam as beam
from apache_beam.io.gcp.pubsub import PubsubMessage, ReadFromPubSub
from apache_beam.pvalue import PBegin

from clickflow.beam import BeamRead, Messages


class ReadSubscription(BeamRead):
    streaming = True

    def expand(self, begin: PBegin) -> Messages:
        return (
            begin
            | "Pull" >> ReadFromPubSub(subscription=self.source.options.subscription, with_attributes=True)
            | "Message" >> beam.Map(message)
        )


def message(received: PubsubMessage) -> list[tuple[str, bytes]]:
    """A batch of one: a streaming pipeline parses each message as it comes."""
    return [(received.message_id, received.data)]
