"""Options structs: human units, partial groups over a plugin's defaults, and where an error is."""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from clickflow.options import BatchLimits, OptionsError, parse_bytes, parse_duration, validate_options
from clickflow_duckdb import DuckDBSinkOptions
from clickflow_live.sink import LiveSinkOptions


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("30s", 30), ("5m", 300), ("1h", 3600), ("7d", 604800), (12, 12), (1.5, 1.5), ("0s", 0)],
)
def test_durations_read_human_units(text: str | float, seconds: float) -> None:
    assert parse_duration(text) == timedelta(seconds=seconds)


@pytest.mark.parametrize(
    ("value", "message"),
    [("-1s", "cannot be negative"), ("soon", "not a duration"), (True, "not a duration"), ("inf", "longer than a year"),
     (None, "not a duration"), ([1], "not a duration")],
)  # fmt: skip
def test_bad_durations_say_why(value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_duration(value)


@pytest.mark.parametrize(
    ("text", "size"),
    [("16MiB", 16 * 2**20), ("5MB", 5_000_000), ("1.5GiB", 3 * 2**29), ("512 KiB", 2**19), (1024, 1024), ("7", 7),
     ("3b", 3)],
)  # fmt: skip
def test_sizes_read_human_units(text: str | int, size: int) -> None:
    assert parse_bytes(text) == size


@pytest.mark.parametrize("value", ["-5MB", "12 parsecs", "MB", True, -1, 1.5, "1e400GB", "9" * 400 + "GB"])
def test_bad_sizes_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"not a size|cannot be negative|too large"):
        parse_bytes(value)


@given(st.integers(min_value=0, max_value=10**7), st.sampled_from(["ms", "s", "m", "h"]))
def test_a_duration_reads_back_what_was_written(amount: int, unit: str) -> None:
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    if amount * scale <= 366 * 86400:
        assert parse_duration(f"{amount}{unit}") == timedelta(seconds=amount * scale)
    else:
        with pytest.raises(ValueError, match="longer than a year"):
            parse_duration(f"{amount}{unit}")


def test_a_partial_group_keeps_the_plugins_own_other_defaults() -> None:
    options = validate_options(DuckDBSinkOptions, {"batch": {"max_age": "1s"}})
    assert options.batch.max_age == timedelta(seconds=1)
    assert options.batch.max_rows == DuckDBSinkOptions().batch.max_rows == 300_000
    assert options.batch.max_rows != BatchLimits().max_rows


@pytest.mark.parametrize(
    ("data", "loc", "problem"),
    [
        ({"batch": {"max_rows": 0}}, ("batch", "max_rows"), "expected int >= 1"),
        ({"batch": {"max_rowz": 5}}, ("batch", "max_rowz"), "unknown option"),
        ({"alerts": [{"name": "a", "kind": "spike"}, {"name": "b", "kind": "spike", "ratio": 1}]},
         ("alerts", 1, "ratio"), "expected float > 1.0"),
        ({"alerts": [{"name": "a", "kind": "threshold"}]}, ("alerts", 0), "alert a: a threshold alert needs above"),
        ({"alerts": [{"kind": "spike"}]}, ("alerts", 0, "name"), "required"),
        ({"refresh": "often"}, ("refresh",), "'often' is not a duration"),
        ({"top_pages": "many"}, ("top_pages",), "expected int, got str"),
        ({"alerts": "none"}, ("alerts",), "expected a list, got str"),
        ({"alerts": [{"name": "a", "kind": "sudden"}]}, ("alerts", 0, "kind"),
         "expected one of 'spike', 'threshold', got 'sudden'"),
    ],
)  # fmt: skip
def test_an_error_says_where_it_is(data: dict[str, object], loc: tuple[str | int, ...], problem: str) -> None:
    with pytest.raises(OptionsError) as raised:
        validate_options(LiveSinkOptions, data)
    assert raised.value.loc == loc
    assert raised.value.problem.startswith(problem), raised.value.problem
