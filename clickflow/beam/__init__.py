"""Runs a pipeline file on Apache Beam: ``clickflow run PIPELINE --runner beam|dataflow``.

Needs the ``beam`` extra. A source or sink runs on Beam when its class names a
translation in its ``beam`` attribute (``module:Class``, imported only here):

- a ``BeamRead`` turns the source's options into a PCollection of message
  batches, lists of ``(message_id, data)`` with the ids the async runtime uses;
- a ``BeamWrite`` takes the four tables, a dict of PCollections of row batches
  (lists of tuples in the column order of ``clickflow.schema``), and writes them.

Elements are batches because Beam's cost is per element: one per message and
per row made the local runner several times slower.

Between them ``ParseVisits`` runs the async runtime's ``VisitParser``, one table
per tagged output. ``clickflow.beam.launch`` checks and builds the whole thing.
"""

from clickflow.beam.transforms import BeamRead, BeamWrite, Messages, ParseVisits, Tables, on_dataflow

__all__ = ["BeamRead", "BeamWrite", "Messages", "ParseVisits", "Tables", "on_dataflow"]
