"""The array reader's recovery from broken elements: where one whose brackets never balance
ends (on a line, within a line, or at a closing bracket that is not the array's), how much it
costs on hostile input, and that a damaged visit costs no other."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clickflow.config import Pipeline
from clickflow.testing import run_pipeline
from clickflow_file.reader import iter_messages
from tests.conftest import table_counts

UNBALANCED = b'{"a": [1, {"b": "x}'
"""An element whose brackets never balance, with a string left open."""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # one element per line
            b'[{"a": 1},\n' + UNBALANCED + b',\n{"c": 3},\n{"d": [4]}]',
            [b'{"a": 1}', UNBALANCED, b'{"c": 3}', b'{"d": [4]}'],
        ),
        (  # indented: objects nested deeper in the broken element are its own
            b'[\n  {"a": [\n    {"x": 1},\n    {"y": 2}\n  },\n\n  {"c": 3}\n]',
            [b'{"a": [\n    {"x": 1},\n    {"y": 2}\n  }', b'{"c": 3}'],
        ),
        (  # brackets that balance stand: objects at the start of lines inside are the element's
            b'[{"a": 1, "events": [\n{"x": 1},\n{"y": 2}], "b": tru},\n{"c": 3}]',
            [b'{"a": 1, "events": [\n{"x": 1},\n{"y": 2}], "b": tru}', b'{"c": 3}'],
        ),
        (  # a next line that does not start a whole object goes on with the broken element
            b"[" + UNBALANCED + b',\n{"c": tru},\n{"d": 4} 5,\n{"e": 5}]',
            [UNBALANCED + b',\n{"c": tru},\n{"d": 4} 5', b'{"e": 5}'],
        ),
    ],
)
@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_an_element_whose_brackets_never_balance_ends_where_the_next_line_starts_an_element(
    monkeypatch: pytest.MonkeyPatch, chunk: int, text: bytes, expected: list[bytes]
) -> None:
    """It used to take the rest of the array along: one dead letter of at most 16 MiB, and what
    lay past it lost."""
    import clickflow_file.reader as reader

    monkeypatch.setattr(reader, "CHUNK", chunk)
    found = list(iter_messages(io.BufferedReader(io.BytesIO(text)), "f"))
    assert found == [(f"f:[{i}]", element) for i, element in enumerate(expected)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # all on one line, as json.dump writes an array
            b'[{"a": 1}, ' + UNBALANCED + b', {"c": 3}, {"d": [4]}]',
            [b'{"a": 1}', UNBALANCED, b'{"c": 3}', b'{"d": [4]}'],
        ),
        (  # objects nested in the broken element are its own: their run ends inside it
            b'[{"s": "open, "e": [{"x": 1}, {"y": 2}]}, {"c": 3}]\n{"line": 2}\n',
            [b'{"s": "open, "e": [{"x": 1}, {"y": 2}]}', b'{"c": 3}', b'{"line": 2}'],
        ),
        (  # a run that the file cuts short is not the array's: the rest is one message
            b"[" + UNBALANCED + b', {"c": 3}, {"d": ',
            [UNBALANCED + b', {"c": 3}, {"d": '],
        ),
        (  # nor one that text other than a line's end follows
            b"[" + UNBALANCED + b', {"c": 3}] 4\n',
            [UNBALANCED + b', {"c": 3}] 4\n'],
        ),
    ],
)
@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_a_broken_element_within_a_line_ends_where_a_run_of_elements_to_the_array_end_starts(
    monkeypatch: pytest.MonkeyPatch, chunk: int, text: bytes, expected: list[bytes]
) -> None:
    """An array on one line has no line to start the next element: what follows a broken element
    went into one dead letter, and past 16 MiB it was lost."""
    import clickflow_file.reader as reader

    monkeypatch.setattr(reader, "CHUNK", chunk)
    found = list(iter_messages(io.BufferedReader(io.BytesIO(text)), "f"))
    ids = [f"f:[{i}]" for i in range(len(expected))]
    if expected[-1] == b'{"line": 2}':
        ids[-1] = "f:2"
    assert found == list(zip(ids, expected, strict=True))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (  # a visit that lost the opening of its events: they look like the array's, and its closers close it
            b'[{"v": {"x": 1}}, {"e": 1}]},\n{"c": 3}]\n',
            [b'{"v": {"x": 1}}', b'{"e": 1}', b"]}", b'{"c": 3}'],
        ),
        (
            b'[{"v": 1}}, {"e": 2}]}, {"c": 3}, {"d": 4}]',
            [b'{"v": 1}', b"}", b'{"e": 2}', b"]}", b'{"c": 3}', b'{"d": 4}'],
        ),
    ],
)
def test_a_closing_bracket_that_text_like_an_element_s_end_follows_does_not_close_the_array(
    text: bytes, expected: list[bytes]
) -> None:
    """It closed the array, and what followed was read as lines: every visit after it a dead letter,
    or, on one line, one line (cut at 64 MiB)."""
    found = list(iter_messages(io.BufferedReader(io.BytesIO(text)), "f"))
    assert found == [(f"f:[{i}]", element) for i, element in enumerate(expected)]


def test_a_closing_bracket_no_element_follows_closes_the_array() -> None:
    found = list(iter_messages(io.BufferedReader(io.BytesIO(b'[{"a": 1}],\n{"b": 2}\n')), "f"))
    assert found == [("f:[0]", b'{"a": 1}'), ("f:1", b","), ("f:2", b'{"b": 2}')]


def _simulated_visits() -> list[bytes]:
    from datetime import UTC, datetime

    from clickflow_simulator import VisitGenerator

    generator = VisitGenerator(seed=3, start=datetime(2026, 1, 1, tzinfo=UTC))
    return [generator.message(i) for i in range(20)]


SIMULATED = _simulated_visits()
LAYOUTS = {
    "one line": (b"[", b", ", b"]"),
    "a visit a line": (b"[", b",\n", b"]\n"),
    "indented": (b"[\n  ", b",\n  ", b"\n]\n"),
}


@settings(max_examples=1000)
@given(
    damaged=st.integers(0, len(SIMULATED) - 1),
    where=st.floats(0, 1, exclude_max=True),
    damage=st.sampled_from(["quote", "brace", "bracket", "delete", "cut"]),
    size=st.integers(1, 30),
    layout=st.sampled_from(sorted(LAYOUTS)),
)
def test_a_damaged_visit_costs_no_other(damaged: int, where: float, damage: str, size: int, layout: str) -> None:
    """A quote, brace or bracket added, bytes deleted or the visit cut short: every other visit
    still comes out whole, whatever the array's layout."""
    visit = SIMULATED[damaged]
    at = 1 + int(where * (len(visit) - 2))
    broken = {
        "quote": visit[:at] + b'"' + visit[at:],
        "brace": visit[:at] + b"{}"[size % 2 : size % 2 + 1] + visit[at:],
        "bracket": visit[:at] + b"[]"[size % 2 : size % 2 + 1] + visit[at:],
        "delete": visit[:at] + visit[at + size :],
        "cut": visit[:at],
    }[damage]
    start, between, end = LAYOUTS[layout]
    text = start + between.join([*SIMULATED[:damaged], broken, *SIMULATED[damaged + 1 :]]) + end
    found = {element for _, element in iter_messages(io.BufferedReader(io.BytesIO(text)), "f")}
    assert found.issuperset(SIMULATED[:damaged] + SIMULATED[damaged + 1 :])


def test_a_run_of_elements_longer_than_the_window_is_the_array_s(monkeypatch: pytest.MonkeyPatch) -> None:
    """The array's end may be a gigabyte away: a run of whole elements that long is taken as the
    array's rest, and the reader holds no more than ``MAX_ELEMENT`` of it."""
    import clickflow_file.elements as elements
    import clickflow_file.reader as reader

    monkeypatch.setattr(reader, "MAX_ELEMENT", 400)
    monkeypatch.setattr(reader, "CHUNK", 16)
    monkeypatch.setattr(elements, "RUN_ON", 100)
    objects = [b'{"n": %d}' % i for i in range(1000)]
    text = b"[" + b", ".join([UNBALANCED, *objects]) + b"] 1\n"  # not the array's end that a run needs
    found = list(iter_messages(io.BufferedReader(io.BytesIO(text)), "f"))
    assert found[:-1] == [(f"f:[{i}]", element) for i, element in enumerate([UNBALANCED, *objects])]
    assert found[-1] == ("f:1", b"1")


def test_a_broken_element_far_from_the_end_is_resolved_within_max_element(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its brackets might still balance further on, so the reader reads on, but never holds more
    than ``MAX_ELEMENT`` of it: there it looks for the line that starts the next element."""
    import clickflow_file.reader as reader

    monkeypatch.setattr(reader, "MAX_ELEMENT", 200)
    monkeypatch.setattr(reader, "CHUNK", 16)
    objects = [b'{"n": %d}' % i for i in range(100)]
    text = b"[" + b",\n".join([UNBALANCED, *objects]) + b"]\n"
    found = list(iter_messages(io.BufferedReader(io.BytesIO(text)), "f"))
    assert found == [(f"f:[{i}]", element) for i, element in enumerate([UNBALANCED, *objects])]


def test_a_hostile_broken_element_has_a_bounded_number_of_lines_judged(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each line opens one more bracket, so ``json`` reads on for a thousand lines before it gives up
    on one: judged line by line, a megabyte of them took 15 s."""
    import clickflow_file.elements as elements

    scans = 0

    def counted(text: str, at: int) -> tuple[Any, int]:
        nonlocal scans
        scans += 1
        return scan(text, at)

    scan = elements.scan
    monkeypatch.setattr(elements, "scan", counted)
    text = b'[{"a": [' + b',\n{"k": [1' * 20_000 + b"]\n"
    found = list(iter_messages(io.BufferedReader(io.BytesIO(text)), "f"))
    assert found == [("f:[0]", text[1:])]  # never ends: the rest is its one dead letter
    assert scans == elements._MAX_TRIES  # of the 20,000 lines that start with an object


def test_a_rest_over_max_remainder_is_cut_there_and_says_what_it_skipped(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import clickflow_file.reader as reader

    monkeypatch.setattr(reader, "MAX_REMAINDER", 50)
    text = b'[{"a": "x' + b" y" * 100
    assert list(iter_messages(io.BufferedReader(io.BytesIO(text)), "f")) == [("f:[0]", text[1:51])]
    assert f"its first 50 bytes; {len(text) - 1 - 50} more skipped" in caplog.text


def test_a_one_line_array_with_a_visit_broken_in_the_middle_loses_no_other(
    tmp_path: Path, visit: Callable[..., dict[str, Any]], pipeline: Callable[..., Pipeline]
) -> None:
    """As ``json.dump`` writes an array, with an unescaped quote in one visit: every element after
    it went into one dead letter."""
    visits = [json.dumps(visit(session_id=f"S{i}")) for i in range(2000)]
    visits[700] = visits[700].replace('"S700"', '"S"700"')
    source = tmp_path / "visits.json"
    source.write_text("[" + ", ".join(visits) + "]")
    db = tmp_path / "out.duckdb"
    text = f"sources: [{{type: file, path: '{source}'}}]\nsinks: [{{type: duckdb, path: '{db}'}}]"
    summary = run_pipeline(pipeline(text))
    assert sum(summary.messages.values()) == 2000
    assert summary.dead_letters == {"invalid_json": 1}
    assert table_counts(db)["visits"] == 1999
