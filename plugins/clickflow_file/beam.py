"""The ``file`` source on Beam: the same readers, on files Beam's filesystems match and open.

Patterns are matched like the async source's (local paths on the launching
machine, ``gs://`` objects listed through Beam's filesystems), each file is read whole
by one worker with ``iter_messages``, so message ids are the async runtime's
(``PATH:LINE#FINGERPRINT`` or ``PATH:[INDEX]#FINGERPRINT``, local paths made absolute first), and the
batches of ``batch_size`` messages are spread over Dataflow's workers before
parsing. A file is the unit of parallel reading: many files read faster than one big one.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import PBegin
from apache_beam.transforms import combiners

from clickflow.api import valid_text
from clickflow.beam import BeamRead, Messages, on_dataflow
from clickflow_file import FileSourceOptions, each_file_once, expand_local, gcs
from clickflow_file.globs import literal_prefix, matches
from clickflow_file.reader import STDIN, CountingReader, batched, iter_messages, with_content_ids


class ReadFiles(BeamRead):
    def refusal(self, options: PipelineOptions) -> str | None:
        if STDIN in self.source.options.patterns():
            return f"Beam reads files, not standard input ({STDIN!r}): write it to a file, or run without --runner"
        local = [p for p in self.source.options.patterns() if not p.startswith("gs://")]
        if local and on_dataflow(options):
            return f"Dataflow's workers cannot read this machine's files ({local[0]}): use gs:// paths"
        return None

    def expand(self, begin: PBegin) -> Messages:
        options: FileSourceOptions = self.source.options
        patterns = [p if p.startswith("gs://") else os.path.abspath(p) for p in options.patterns()]
        messages = (
            begin
            | "Patterns" >> beam.Create(patterns)
            | "Match" >> beam.FlatMap(match)
            | "All names" >> combiners.ToList()
            | "Each once" >> beam.FlatMap(each_file_once)
            | "Spread files" >> beam.Reshuffle()
            | "Read" >> beam.FlatMap(read_file, options.batch_size, options.batch_bytes)
        )
        if on_dataflow(begin.pipeline.options):
            # more workers than files; a local runner would hold every batch in memory here
            messages = messages | "Spread batches" >> beam.Reshuffle()
        return messages


def match(pattern: str) -> list[str]:
    """The files a pattern names, matched as the async source matches them (``**`` may stand for
    no directory at all, which Beam's own matcher does not allow); none is an error."""
    if not pattern.startswith("gs://"):
        return expand_local(pattern)
    bucket, name = gcs.split(pattern)
    listing = f"gs://{bucket}/{literal_prefix(name)}**" if glob.has_magic(name) else pattern
    listed = FileSystems.match([listing])[0].metadata_list
    found = sorted(m.path for m in listed if matches(name, gcs.split(m.path)[1]))
    if not found:
        raise FileNotFoundError(f"no object matches {pattern!r}")
    return found


def read_file(path: str, batch_size: int, batch_bytes: int) -> Iterator[list[tuple[str, bytes]]]:
    """Every message of one file, in batches of ``batch_size`` messages or ``batch_bytes`` (gzip is
    recognised by its content, as in the async runtime)."""
    name = valid_text(path)
    reader = CountingReader(FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED), name)
    try:
        yield from batched(with_content_ids(iter_messages(reader.stream, name)), batch_size, batch_bytes)
    finally:
        reader.close()
