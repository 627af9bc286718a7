"""The pieces a Beam translation is made of: reads, the parser as a DoFn, writes."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import apache_beam as beam
from apache_beam.metrics.metric import Metrics
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
from apache_beam.pvalue import PBegin, PCollection, TaggedOutput

from clickflow.api import AnySink, AnySource, Message
from clickflow.parser import VisitParser
from clickflow.schema import TABLE_NAMES, DeadLetterCol

Row = tuple[Any, ...]
Messages = PCollection[list[tuple[str, bytes]]]
"""Batches of ``(message_id, data)``."""
Tables = dict[str, PCollection[list[Row]]]
"""The four tables by name, each a PCollection of batches of row tuples in the schema's column order."""

DATAFLOW_RUNNER = "DataflowRunner"
METRICS_NAMESPACE = "clickflow"
"""Counters ``messages:SOURCE``, ``rows:TABLE`` and ``dead_letter:REASON``, read into the run's summary."""


def on_dataflow(options: PipelineOptions) -> bool:
    """Whether the pipeline goes to Dataflow's workers rather than a runner on this machine."""
    return bool(options.view_as(StandardOptions).runner == DATAFLOW_RUNNER)


class BeamRead(beam.PTransform[PBegin, Messages]):
    """A source on Beam: batches of ``(message_id, data)``, every message it reads once."""

    streaming: ClassVar[bool] = False
    """True for unbounded sources: the pipeline runs in Beam's streaming mode."""

    def __init__(self, source: AnySource) -> None:
        super().__init__()
        self.source = source

    def refusal(self, options: PipelineOptions) -> str | None:
        """Why this source cannot run with these options (runner, streaming), or None."""
        return None


class BeamWrite(beam.PTransform[Tables, None]):
    """A sink on Beam: writes the four tables."""

    def __init__(self, sink: AnySink) -> None:
        super().__init__()
        self.sink = sink

    def refusal(self, options: PipelineOptions) -> str | None:
        """Why this sink cannot run with these options (runner, streaming), or None."""
        return None

    def finish(self, rows: Mapping[str, int]) -> int:
        """Called in the launching process once a local batch pipeline has finished, with the
        number of rows each table received; returns the visits found stored already, if it can tell
        (``SinkContext.stored_already``)."""
        return 0


class ParseVisits(beam.DoFn):
    """The async runtime's parser; each table is a tagged output (``dead_letter`` among them)."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.source = source
        self.messages = Metrics.counter(METRICS_NAMESPACE, f"messages:{source}")
        self.rows = {table: Metrics.counter(METRICS_NAMESPACE, f"rows:{table}") for table in TABLE_NAMES}

    def setup(self) -> None:
        self.parser = VisitParser()

    def process(self, batch: list[tuple[str, bytes]]) -> Iterator[TaggedOutput[str, list[Row]]]:
        messages = [Message(data, message_id) for message_id, data in batch]
        rows = self.parser.parse(messages, self.source, time.time_ns() // 1000)
        self.messages.inc(len(messages))
        for table, table_rows in rows.tables.items():
            if table_rows:
                self.rows[table].inc(len(table_rows))
                yield TaggedOutput(table, table_rows)
        for row in rows.tables["dead_letter"]:
            Metrics.counter(METRICS_NAMESPACE, f"dead_letter:{row[DeadLetterCol.reason]}").inc()


def parse(messages: Messages, source: str) -> Tables:
    """The tables parsed from one source's messages."""
    outputs = messages | f"Parse {source}" >> beam.ParDo(ParseVisits(source)).with_outputs(*TABLE_NAMES)
    return {table: outputs[table] for table in TABLE_NAMES}
