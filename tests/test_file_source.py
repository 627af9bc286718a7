"""The file source: JSON lines, JSON arrays, gzip, globs, stable ids; real files end to end."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import duckdb
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clickflow.config import Pipeline
from clickflow.options import OptionsError, validate_options
from clickflow.runtime import PipelineError, Runtime
from clickflow.testing import run_pipeline
from clickflow_file import FileSource, FileSourceOptions, expand_paths
from clickflow_file.reader import CountingReader, iter_array, iter_lines, iter_messages
from tests.conftest import table_counts


def lines(*visits: Any) -> bytes:
    return b"".join((v if isinstance(v, bytes) else json.dumps(v).encode()) + b"\n" for v in visits)


def test_json_lines_skip_blank_lines_and_number_by_line() -> None:
    stream = io.BytesIO(b'{"a": 1}\n\n   \n{"b": 2}\r\n')
    assert list(iter_lines(stream, "f.jsonl")) == [("f.jsonl:1", b'{"a": 1}'), ("f.jsonl:4", b'{"b": 2}')]


def test_array_elements_keep_their_original_bytes() -> None:
    text = '\ufeff [ {"a": [1, {"b": "]"}]} ,\n"x" , 3.5,{"c":"\\u00e9 \u00e9"} ]  '
    stream = io.BytesIO(text.encode())
    assert list(iter_array(stream, "f.json")) == [
        ("f.json:[0]", b'{"a": [1, {"b": "]"}]}'),
        ("f.json:[1]", b'"x"'),
        ("f.json:[2]", b"3.5"),
        ("f.json:[3]", '{"c":"\\u00e9 \u00e9"}'.encode()),
    ]


def test_array_elements_larger_than_a_read_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    import clickflow_file.reader as reader

    monkeypatch.setattr(reader, "CHUNK", 7)
    elements = [{"session_id": "S" * 30, "n": i} for i in range(5)]
    found = [json.loads(data) for _, data in iter_array(io.BytesIO(json.dumps(elements).encode()), "f")]
    assert found == elements


def test_empty_array_yields_nothing() -> None:
    assert list(iter_array(io.BytesIO(b" [ ] "), "f")) == []


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (b'[{"a": 1}, {"b": ', [b'{"a": 1}', b'{"b": ']),  # cut off: the rest is the last message
        (b'[{"a": 1},', [b'{"a": 1}', b""]),
        (b'[{"a": 1} {"b": 2}]', [b'{"a": 1}', b'{"b": 2}']),  # no comma: read as an element of its own
        (b'[1, tru, {"b": 2}]', [b"1", b"tru", b'{"b": 2}']),
        (b"[1.2.3 , 4]", [b"1.2", b".3", b"4"]),
        (b"[1}, 2,, 3,]", [b"1", b"}", b"2", b"", b"3", b""]),
    ],
)
def test_a_malformed_array_loses_no_byte_of_it(text: bytes, expected: list[bytes]) -> None:
    """What json cannot read is cut at the array's next comma or bracket and goes on as its own
    message (the parser dead-letters it); what never ends is the last message."""
    assert list(iter_array(io.BytesIO(text), "f")) == [(f"f:[{i}]", element) for i, element in enumerate(expected)]


DEEP = b"[" * 5000 + b'"]}\\"", {"[": "{"}' + b"]" * 5000
"""An element nested past ``json``'s recursion limit, with brackets and an escaped quote in strings."""


def deep(depth: int, inner: bytes) -> bytes:
    return b"[" * depth + inner + b"]" * depth


elements = st.one_of(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(alphabet='[]{}"\\, \n\u00e9x'),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
        max_leaves=8,
    ).map(lambda value: json.dumps(value, ensure_ascii=False).encode()),
    st.sampled_from([b'{"a": tru}', b'{"a" 1, "b": "}"}', b"[1 2]", b'{"\xff": NaN]', b"[{]}"]),
    st.sampled_from([b"tru", b"'single'", b"\x00\x00 \x00", b"@{[}]", b'-"],"']),
    st.tuples(st.integers(4000, 6000), st.sampled_from([b"", b'"]\\"["', b'{"}": 1}', b"[1 2}{]"])),
)
"""Any JSON value; an object or array that is malformed but whose brackets balance; something
else json cannot read, up to the next comma outside brackets and strings; or (depth,
text) for ``deep``: too deep for json's scanner (even with the recursion limit hypothesis raises),
sometimes malformed inside. Judging them is the parser's, not the reader's."""


@given(
    values=st.lists(elements, max_size=5),
    tail=st.lists(st.sampled_from([b'{"a": 1}', b"", b"  ", b"[1, 2]", "{\u00e9}".encode()]), max_size=3),
    chunk=st.sampled_from([7, 64, 4096, 1 << 20]),
)
def test_every_element_and_every_line_after_the_array_comes_out_whole(
    values: list[bytes | tuple[int, bytes]], tail: list[bytes], chunk: int
) -> None:
    """However deeply an element nests, whether json can read it, and wherever the reads cut the
    text, each element comes out as its own bytes, and what follows the closing bracket as JSON
    lines numbered in the file."""
    import clickflow_file.reader as reader

    values_text = [value if isinstance(value, bytes) else deep(*value) for value in values]
    after = b"".join(b"\n" + line for line in tail)
    text = b"[" + b",\n ".join(values_text) + b"]" + after
    original, reader.CHUNK = reader.CHUNK, chunk
    try:
        found = list(iter_messages(io.BufferedReader(io.BytesIO(text)), "f"))
    finally:
        reader.CHUNK = original
    array_ends_on = 1 + text[: len(text) - len(after)].count(b"\n")
    lines = [(f"f:{array_ends_on + 1 + i}", line.strip()) for i, line in enumerate(tail) if line.strip()]
    assert found == [(f"f:[{i}]", value) for i, value in enumerate(values_text)] + lines


@pytest.mark.parametrize("chunk", [7, 64, 4096])
def test_an_array_element_over_the_limit_is_cut_there_and_the_rest_read_on(
    monkeypatch: pytest.MonkeyPatch, chunk: int
) -> None:
    """As a line over the limit is: its head goes on (the parser dead-letters it as too large),
    the rest of it is skipped without being held, whatever strings and brackets are in it."""
    import clickflow_file.reader as reader

    monkeypatch.setattr(reader, "MAX_ELEMENT", 40)
    monkeypatch.setattr(reader, "CHUNK", chunk)
    big = json.dumps({"big": list(range(100)), "s": 'x]}"' * 100, "deep": [[[[]]]]}).encode()
    text = b'[{"a": 1}, ' + big + b", " + DEEP + b', {"b": 2}]\n{"line": 3}\n'
    assert list(iter_messages(io.BufferedReader(io.BytesIO(text)), "f")) == [
        ("f:[0]", b'{"a": 1}'),
        ("f:[1]", big[:41]),
        ("f:[2]", DEEP[:41]),
        ("f:[3]", b'{"b": 2}'),
        ("f:2", b'{"line": 3}'),
    ]
    cut_off = b'[{"a": 1}, ' + big[:300]
    assert list(iter_messages(io.BufferedReader(io.BytesIO(cut_off)), "f")) == [
        ("f:[0]", b'{"a": 1}'),
        ("f:[1]", big[:41]),
    ]


def test_a_json_lines_file_that_starts_with_an_array_loses_no_line() -> None:
    text = b'[1, "two"] {"same": "line"}\n\n{"a": 1}\n[3]\n'
    assert list(iter_messages(io.BufferedReader(io.BytesIO(text)), "f")) == [
        ("f:[0]", b"1"),
        ("f:[1]", b'"two"'),
        ("f:1", b'{"same": "line"}'),
        ("f:3", b'{"a": 1}'),
        ("f:4", b"[3]"),
    ]


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be", "utf-32-le", "utf-32-be"])
@pytest.mark.parametrize("gzipped", [False, True])
def test_a_file_in_utf_16_or_32_with_its_byte_order_mark_is_read_as_utf_8(encoding: str, gzipped: bool) -> None:
    """As Windows PowerShell 5.1 writes what is redirected to a file (UTF-16 LE): every line was a
    dead letter. A lone surrogate spoils its own line only, as invalid UTF-8, and so does a file
    cut inside a character."""
    import codecs

    from clickflow_file.reader import CountingReader

    bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE,
           "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE}[encoding]  # fmt: skip
    text = '[{"a": "\u00e9t\u00e9"}, {"b": 1}]\r\n{"c": "\U0001f600"}\n{"d": "\ud800"}\n{"e": 5}'
    data = bom + text.encode(encoding, "surrogatepass")[:-1]  # cut inside the last character
    reader = CountingReader(io.BytesIO(gzip.compress(data) if gzipped else data), "visits")
    assert list(iter_messages(reader.stream, "f")) == [
        ("f:[0]", '{"a": "\u00e9t\u00e9"}'.encode()),
        ("f:[1]", b'{"b": 1}'),
        ("f:2", '{"c": "\U0001f600"}'.encode()),
        ("f:3", b'{"d": "\xed\xa0\x80"}'),
        ("f:4", b'{"e": 5' + "}".encode(encoding)[:-1]),  # what is left of the cut character, as it is
    ]


@pytest.mark.parametrize("gzipped", [False, True])
@pytest.mark.parametrize("text", ['{"a": 1}\r\n{"b": 2}\r\n', '[{"a": 1}, {"b": 2}]'], ids=["lines", "array"])
def test_a_utf_8_byte_order_mark_is_skipped(text: str, gzipped: bool) -> None:
    """As Windows PowerShell 5.1's ``Out-File -Encoding utf8`` writes: a file of lines had its first
    visit dead-lettered as invalid JSON."""
    import codecs

    from clickflow_file.reader import CountingReader

    data = codecs.BOM_UTF8 + text.encode()
    reader = CountingReader(io.BytesIO(gzip.compress(data) if gzipped else data), "visits")
    messages = [data for _, data in iter_messages(reader.stream, "f")]
    assert messages == [b'{"a": 1}', b'{"b": 2}']


def test_paths_globs_and_lists_expand_in_order(tmp_path: Path) -> None:
    for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl.gz"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    patterns = [str(tmp_path / "*.jsonl"), str(tmp_path / "**/*.gz"), str(tmp_path / "a.jsonl")]
    found = anyio.run(expand_paths, patterns)
    assert [Path(p).relative_to(tmp_path).as_posix() for p in found] == ["a.jsonl", "b.jsonl", "sub/c.jsonl.gz"]


def test_a_file_named_through_links_is_read_once_under_its_name_without_links(
    tmp_path: Path, visit: Callable[..., dict[str, Any]], pipeline: Callable[..., Pipeline]
) -> None:
    """Python's ``glob`` follows every link: with ``latest -> 2024-07-01`` beside a link back up, the
    paths of ``**/*.jsonl`` doubled at each level and the run never started; with the link back up
    alone it read each file 41 times, and as a name is part of each message's id, stored 41
    copies of every visit."""
    day = tmp_path / "in" / "2024-07-01"
    day.mkdir(parents=True)
    (day / "visits.jsonl").write_bytes(lines(visit(), visit(session_id="SID-2")))
    (tmp_path / "in" / "latest").symlink_to("2024-07-01")
    (day / "up").symlink_to("..")
    patterns = [f"{tmp_path}/in/latest/visits.jsonl", f"{tmp_path}/in/**/*.jsonl"]
    found = anyio.run(expand_paths, patterns)
    assert found == [str(day / "visits.jsonl")]
    assert anyio.run(expand_paths, patterns[::-1]) == found  # the same name, whatever the order
    db = tmp_path / "out.duckdb"
    summary = run_pipeline(pipeline(
        f"sources: [{{type: file, path: {json.dumps(patterns)}}}]\nsinks: [{{type: duckdb, path: '{db}'}}]"
    ))  # fmt: skip
    assert summary.messages == {"file": 2}
    assert table_counts(db)["visits"] == 2


def test_a_file_with_two_names_without_links_is_read_once_under_the_shorter(tmp_path: Path) -> None:
    (tmp_path / "long-name.jsonl").write_bytes(b"{}\n")
    os.link(tmp_path / "long-name.jsonl", tmp_path / "a.jsonl")
    (tmp_path / "b.jsonl").write_bytes(b"{}\n")  # the same bytes, another file: read too
    assert anyio.run(expand_paths, [f"{tmp_path}/*.jsonl"]) == [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]


@pytest.mark.parametrize("pattern", ["missing.jsonl", "nothing-*.jsonl"])
def test_unmatched_path_is_an_error(tmp_path: Path, pattern: str) -> None:
    with pytest.raises(FileNotFoundError):
        anyio.run(expand_paths, [str(tmp_path / pattern)])


def write_inputs(tmp_path: Path, visit: Callable[..., dict[str, Any]]) -> dict[str, int]:
    """Five files of every format, valid and malformed mixed; returns what they must produce."""
    good, bad_event = visit(), visit()
    bad_event["events"].append({"event_type": "hover", "timestamp": "2024-07-01T09:00:00", "details": {}})
    (tmp_path / "a.jsonl").write_bytes(lines(good, b"{oops", good, b"", bad_event))
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as out:
        out.write(lines(good, [1, 2], {"events": []}))
    (tmp_path / "c.json").write_text(json.dumps([good, bad_event, "text"]))
    with gzip.open(tmp_path / "d.json.gz", "wt") as text_out:
        json.dump([good], text_out)
    (tmp_path / "e.jsonl").write_text(json.dumps(good) + "\r\n", encoding="utf-16")  # with its byte-order mark
    # 11 messages: 8 visits (6 good + 2 with a bad event), 3 rejected whole (bad JSON, array, no session)
    # plus "text" in c.json: 4 rejected whole in total, 8 visits, 2 event-level dead letters
    return {"visits": 8, "events": 24, "purchase_items": 8, "dead_letter": 4 + 2}


def test_every_message_of_every_format_is_accounted_for(
    tmp_path: Path, visit: Callable[..., dict[str, Any]], pipeline: Callable[..., Pipeline]
) -> None:
    expected = write_inputs(tmp_path, visit)
    db = tmp_path / "out.duckdb"
    text = (
        f"sources: [{{type: file, path: '{tmp_path}/*.json*', batch_size: 2}}]\nsinks: [{{type: duckdb, path: '{db}'}}]"
    )
    summary = run_pipeline(pipeline(text))
    assert sum(summary.messages.values()) == 12
    assert table_counts(db) == expected
    assert summary.dead_letters == {"invalid_json": 1, "not_an_object": 2, "invalid_session_id": 1,
                                    "unknown_event_type": 2}  # fmt: skip


def test_rerunning_the_same_files_changes_no_count_and_says_so(
    tmp_path: Path, visit: Callable[..., dict[str, Any]], pipeline: Callable[..., Pipeline],
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    expected = write_inputs(tmp_path, visit)
    db = tmp_path / "out.duckdb"
    text = f"sources: [{{type: file, path: '{tmp_path}/*.json*'}}]\nsinks: [{{type: duckdb, path: '{db}'}}]"
    caplog.set_level("INFO")
    assert not run_pipeline(pipeline(text)).stored_already
    assert "stored already" not in caplog.text
    again = Runtime(pipeline(text))
    assert anyio.run(again.run).stored_already == {"duckdb": expected["visits"]}
    metric = again.metrics.registry.get_sample_value("clickflow_visits_stored_already_total", {"sink": "duckdb"})
    assert metric == expected["visits"]
    assert table_counts(db) == expected
    said = [r.getMessage() for r in caplog.records if "stored already" in r.getMessage()]  # the first write's, the rest
    assert all(line.startswith("sink duckdb: ") for line in said)
    assert sum(int(line.split()[2].replace(",", "")) for line in said) == expected["visits"]


def test_a_file_rewritten_in_place_stores_what_changed_and_its_rerun_nothing(
    tmp_path: Path, visit: Callable[..., dict[str, Any]], pipeline: Callable[..., Pipeline]
) -> None:
    """A daily export written over yesterday's under one name: its visits are new ones. With ids of
    path and line alone, the sink dropped all of them as stored, and the run said nothing."""
    export, db = tmp_path / "export.jsonl", tmp_path / "out.duckdb"
    text = f"sources: [{{type: file, path: '{export}'}}]\nsinks: [{{type: duckdb, path: '{db}'}}]"
    days = [[visit(session_id=f"{day}-{n}") for n in range(5)] for day in ("mon", "tue")]
    export.write_text("".join(json.dumps(v) + "\n" for v in days[0]))
    run_pipeline(pipeline(text))
    export.write_text("".join(json.dumps(v) + "\n" for v in [*days[1][:4], days[0][4]]))  # one line kept
    run_pipeline(pipeline(text))
    run_pipeline(pipeline(text))  # the same file again: nothing new
    with duckdb.connect(str(db), read_only=True) as con:
        sessions = sorted(row[0] for row in con.execute("SELECT session_id FROM visits").fetchall())
    assert sessions == sorted([f"mon-{n}" for n in range(5)] + [f"tue-{n}" for n in range(4)])
    assert table_counts(db)["events"] == 9 * len(visit()["events"])


def test_a_missing_file_fails_the_run_clearly(tmp_path: Path, pipeline: Callable[..., Pipeline]) -> None:
    text = (
        f"sources: [{{type: file, path: '{tmp_path}/none.jsonl'}}]\n"
        f"sinks: [{{type: duckdb, path: '{tmp_path}/o.duckdb'}}]"
    )
    with pytest.raises(PipelineError, match=r"source 'file' failed: .*none\.jsonl' does not exist"):
        run_pipeline(pipeline(text))


def test_huge_lines_and_payloads_fail_no_batch(tmp_path: Path, pipeline: Callable[..., Pipeline]) -> None:
    """A 9 MB malformed line of quotes (each escapes to two bytes) and a 70 MB line: dead letters,
    where DuckDB's 16 MB row limit used to fail the whole batch and the run."""
    source = tmp_path / "huge.jsonl"
    with source.open("wb") as out:
        out.write(b'{"session_id": "ok"}\n')
        out.write(b'{"session_id": 1, "x": "' + b'\\"' * (4_500_000) + b'"}\n')
        out.write(b"[" + b"1," * (35 * 1024 * 1024) + b"1]\n")
        out.write(b'{"session_id": "also ok"}\n')
    db = tmp_path / "huge.duckdb"
    summary = run_pipeline(
        pipeline(f"sources: [{{type: file, path: '{source}'}}]\nsinks: [{{type: duckdb, path: '{db}'}}]")
    )
    assert summary.dead_letters == {"invalid_session_id": 1, "too_large": 1}
    assert table_counts(db) == {"visits": 2, "events": 0, "purchase_items": 0, "dead_letter": 2}


def test_batches_end_at_batch_bytes_so_large_visits_do_not_fill_memory(tmp_path: Path) -> None:
    """A batch was 1,000 messages whatever their size: 200 visits of 5 MB held 3.2 GB at once."""
    visits = [json.dumps({"session_id": f"s{i}", "user_agent": "x" * (300_000 * (i % 5))}).encode() for i in range(60)]
    source = tmp_path / "large.jsonl"
    source.write_bytes(b"\n".join(visits) + b"\n")
    options = validate_options(FileSourceOptions, {"path": str(source), "batch_bytes": "1MiB"})
    reader = CountingReader.open(str(source))
    try:
        batches = list(FileSource("file", options)._batches(reader, str(source)))
    finally:
        reader.close()
    assert [m.data for batch in batches for m in batch] == visits
    for batch in batches:  # a batch ends with the message that reaches 1 MiB
        assert sum(len(m.data) for m in batch[:-1]) < 1 << 20
    assert 18 <= len(batches) < 60
    with pytest.raises(OptionsError, match="batch_bytes"):
        validate_options(FileSourceOptions, {"path": str(source), "batch_bytes": "64KiB"})


def test_a_file_whose_name_is_not_utf8_is_read_with_a_printable_id(
    tmp_path: Path, pipeline: Callable[..., Pipeline]
) -> None:
    name = os.fsdecode(b"caf\xe9.jsonl")
    (tmp_path / name).write_bytes(b'{"session_id": "S"}\n')
    db = tmp_path / "names.duckdb"
    summary = run_pipeline(
        pipeline(f"sources: [{{type: file, path: '{tmp_path}/*.jsonl'}}]\nsinks: [{{type: duckdb, path: '{db}'}}]")
    )
    assert summary.rows["visits"] == 1
    with duckdb.connect(str(db), read_only=True) as con:
        (message_id,) = con.execute("SELECT message_id FROM visits").fetchone()  # type: ignore[misc]
    assert message_id.startswith(f"{tmp_path}/caf\\xe9.jsonl:1#")


def test_deep_nesting_a_malformed_element_and_an_array_first_line_lose_no_message(
    tmp_path: Path, visit: Callable[..., dict[str, Any]], pipeline: Callable[..., Pipeline]
) -> None:
    """Each used to end the run or drop the rest of a file: an array element nested past json's
    recursion limit failed the source, a malformed object (or one cut short) took every element
    after it into one dead letter, and lines after an array's closing bracket were skipped."""
    good = json.dumps(visit()).encode()
    nested = tmp_path / "deep.json"
    nested.write_bytes(
        b"[" + good + b", " + DEEP + b', {"session_id": tru}, ' + good.replace(b'"events"', b'"x": 1, "events"') + b"]"
    )
    first_line = tmp_path / "first.jsonl"
    first_line.write_bytes(b"[1, 2]\n" + good.replace(b'"events"', b'"y": 2, "events"') + b"\n")
    unbalanced = tmp_path / "unbalanced.json"  # one visit per line, one of them cut short
    visits = [json.dumps(visit(session_id=f"U{i}")).encode() for i in range(1000)]
    unbalanced.write_bytes(b"[" + b",\n".join([*visits[:3], visits[3][:-40], *visits[4:]]) + b"]\n")
    db = tmp_path / "out.duckdb"
    sources = f"sources: [{{type: file, path: ['{nested}', '{first_line}', '{unbalanced}']}}]"
    summary = run_pipeline(pipeline(f"{sources}\nsinks: [{{type: duckdb, path: '{db}'}}]"))
    assert sum(summary.messages.values()) == 7 + 1000
    assert summary.dead_letters == {"too_deep": 1, "invalid_json": 2, "not_an_object": 2}
    assert table_counts(db)["visits"] == 3 + 999
    assert table_counts(db)["dead_letter"] == 5


COMPRESS = {"gzip": gzip.compress, "bzip2": bz2.compress, "xz": lzma.compress}


@pytest.mark.parametrize("name", ["bzip2", "xz"])
def test_a_file_in_bzip2_or_xz_reads_as_its_gzip_does(
    tmp_path: Path, name: str, visit: Callable[..., dict[str, Any]], pipeline: Callable[..., Pipeline]
) -> None:
    """Known by its magic number, whatever its name; it used to fail the run as unread."""
    data = lines(*[visit(session_id=f"S{i}") for i in range(500)], "not json")
    counts = {}
    for compression in ("gzip", name):
        source = tmp_path / f"visits-{compression}.jsonl"
        source.write_bytes(COMPRESS[compression](data))
        db = tmp_path / f"{compression}.duckdb"
        run_pipeline(pipeline(f"sources: [{{type: file, path: '{source}'}}]\nsinks: [{{type: duckdb, path: '{db}'}}]"))
        counts[compression] = table_counts(db)
    assert counts[name] == counts["gzip"] and counts[name]["visits"] == 500 and counts[name]["dead_letter"] == 1


def test_a_file_compressed_with_zstd_fails_the_run_naming_it(tmp_path: Path, pipeline: Callable[..., Pipeline]) -> None:
    """Read as text, each line of it was a dead letter of binary (no zstd in the standard library)."""
    source = tmp_path / "visits.jsonl.z"
    source.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(range(40)))  # a frame's magic number
    db = tmp_path / "out.duckdb"
    text = f"sources: [{{type: file, path: '{source}'}}]\nsinks: [{{type: duckdb, path: '{db}'}}]"
    with pytest.raises(PipelineError, match=r"visits\.jsonl\.z: unreadable after 0 messages: compressed with zstd,"):
        run_pipeline(pipeline(text))
    assert not db.exists() or table_counts(db) == {"visits": 0, "events": 0, "purchase_items": 0, "dead_letter": 0}


@pytest.mark.parametrize("compression", ["gzip", "bzip2", "xz"])
@pytest.mark.parametrize("damage", ["cut short", "corrupt", "header only"])
def test_a_damaged_compressed_file_fails_the_run_naming_the_file(
    tmp_path: Path,
    compression: str,
    damage: str,
    visit: Callable[..., dict[str, Any]],
    pipeline: Callable[..., Pipeline],
) -> None:
    """The error says which file and how far it was read; once the file is whole again, running
    again stores every visit once."""
    whole = COMPRESS[compression](lines(*[visit(session_id=f"S{i}") for i in range(3000)]))
    middle = len(whole) // 2
    source = tmp_path / "visits.jsonl.gz"
    damaged = {
        "cut short": whole[:middle],
        "corrupt": whole[:middle] + bytes(64) + whole[middle + 64 :],
        "header only": whole[:6],  # found as the file is opened, before its first message
    }
    source.write_bytes(damaged[damage])
    db = tmp_path / "out.duckdb"
    text = f"sources: [{{type: file, path: '{source}', batch_size: 100}}]\nsinks: [{{type: duckdb, path: '{db}'}}]"
    with pytest.raises(PipelineError, match=r"visits\.jsonl\.gz: unreadable after \d+ messages: "):
        run_pipeline(pipeline(text))
    source.write_bytes(whole)
    run_pipeline(pipeline(text))
    assert table_counts(db)["visits"] == 3000
