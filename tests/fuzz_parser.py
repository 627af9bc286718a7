"""Coverage-guided fuzzing of the parser with atheris: ``python tests/fuzz_parser.py -runs=N CORPUS``.

Each input is split on NUL bytes into a batch of messages, so the fuzzer also explores batches
that switch between formats. Any exception, or a broken contract, is a crash that atheris reports.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from clickflow import fastpath, parser  # noqa: F401
    from clickflow.api import Message

PARSER = parser.VisitParser()


def one_input(data: bytes) -> None:
    payloads = data.split(b"\0")[:20]
    batch = PARSER.parse([Message(p, f"m{i}") for i, p in enumerate(payloads)], "fuzz", 0)
    whole = sum(1 for row in batch.tables["dead_letter"] if row[4] is None)
    if len(batch.tables["visits"]) + whole != len(payloads):
        raise AssertionError(f"{len(payloads)} messages gave {batch.counts()}")


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
