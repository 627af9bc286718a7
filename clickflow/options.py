"""Options: what a pipeline file says of each component, as msgspec structs.

``validate_options(Options, data)`` turns a YAML mapping into a plugin's options, or raises
``OptionsError`` saying where the problem is. Structs rather than pydantic models: a process
paid 135 to 200 ms to import pydantic and build its first model, whatever the model, which was
a third of ``clickflow validate``; msgspec builds a struct class in microseconds.

A plugin declares ``class MyOptions(SinkOptions, kw_only=True)`` with annotated fields;
constraints are ``Annotated[int, Meta(ge=1)]``, and rules across fields go in ``__post_init__``
(raise ``ValueError``). ``Duration`` and ``ByteSize`` read ``30s`` and ``16MiB``.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from typing import Annotated, Any, Self, TypeVar

import msgspec
from msgspec import Meta

Loc = tuple[str | int, ...]

PositiveInt = Annotated[int, Meta(gt=0)]

HEARTBEAT_EVERY = timedelta(seconds=5)
"""How often a source waiting for room or for requests reports anyway (``heartbeat_within``)."""

GCS_BUCKET = r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]"
"""A Cloud Storage bucket's name, as ``gs://BUCKET/...`` spells it (no wildcard)."""


class Duration(timedelta):
    """A length of time written as ``250ms``, ``30s``, ``5m``, ``1h``, ``7d`` or seconds; not negative."""


class ByteSize(int):
    """A size written as ``16MiB``, ``5MB``, ``1.5GiB`` or a number of bytes; not negative."""


_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_MAX_DURATION = timedelta(days=366)
_BYTE_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "pb": 10**15,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "pib": 2**50,
}  # fmt: skip
_BYTES = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*$")


def parse_duration(value: Any) -> Duration:
    """``250ms``, ``30s``, ``5m``, ``1h``, ``7d`` or a number of seconds, up to a year."""
    if isinstance(value, timedelta):
        seconds = value.total_seconds()
    else:
        text = str(value).strip() if isinstance(value, str | int | float) and not isinstance(value, bool) else ""
        unit = next((u for u in _DURATION_UNITS if text.endswith(u)), "")
        try:
            seconds = float(text.removesuffix(unit)) * _DURATION_UNITS.get(unit, 1.0)
        except ValueError:
            raise ValueError(f"{value!r} is not a duration; write e.g. 250ms, 30s, 5m or 1h") from None
    if not abs(seconds) <= _MAX_DURATION.total_seconds():  # also refuses inf and nan
        raise ValueError(f"{value!r} is longer than a year; write e.g. 30s, 5m or 1h")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return Duration(seconds=seconds)


def parse_bytes(value: Any) -> ByteSize:
    """``16MiB``, ``5MB``, ``1.5GiB`` or a number of bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return ByteSize(value)
    found = _BYTES.match(value) if isinstance(value, str) else None
    unit = found.group(2).lower() if found else ""
    if found is None or unit not in _BYTE_UNITS:
        raise ValueError(f"{value!r} is not a size; write e.g. 512KiB, 16MiB or 1GB")
    size = float(found.group(1)) * _BYTE_UNITS[unit]
    if not math.isfinite(size):
        raise ValueError(f"{value!r} is too large")
    return ByteSize(int(size))


_PARSERS: dict[type, Any] = {Duration: parse_duration, ByteSize: parse_bytes}


def _decode(type_: type, value: Any) -> Any:
    parse = _PARSERS.get(type_)
    if parse is None:
        raise NotImplementedError(type_)
    return parse(value)


def check_range(name: str, value: float | timedelta, low: Any = None, high: Any = None) -> None:
    """For ``__post_init__``: a field of a type ``Meta`` cannot bound (a duration, a size)."""
    if low is not None and value < low:
        raise ValueError(f"{name} must be at least {_shown(low)}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be at most {_shown(high)}")


def _shown(value: Any) -> str:
    if isinstance(value, timedelta):
        return f"{value.total_seconds():g}s"
    return f"{value:,}"


class PluginOptions(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every plugin's options: unknown keys are errors, so typos surface.

    A group of options inside them (``batch:``, ``retry:``) is an ``OptionGroup``."""

    def http_paths(self) -> list[str]:
        """Paths the component serves on the monitoring server; the pipeline then needs ``monitor:``."""
        return []

    def exclusive_resources(self) -> list[str]:
        """What no other component of the same pipeline may use, e.g. ``DuckDB database /abs/path``."""
        return []

    def answer_within(self) -> timedelta | None:
        """A source's: how long a sender waits for its messages to be stored before it takes them as
        not stored and sends them again (the push endpoint's ``ack_timeout``); None if none waits."""
        return None

    def heartbeat_within(self) -> timedelta | None:
        """A source's: the longest it may go between heartbeats while healthy and quiet (a held
        pull, a throttled simulator's wait), or None. A pipeline is refused where this is not
        below ``runtime.heartbeat_max_age``, or ``/healthz`` would fail whenever traffic pauses."""
        return None

    def ids_unique_within(self) -> str | None:
        """A source's: what its message ids are unique within, where other sources' ids may come from
        another one (Pub/Sub's: a topic), or None if no other source's can equal them (files: their
        paths). Sinks key rows on message ids, so a pipeline with two sources that say the same is
        warned: two messages with one id would be stored once."""
        return None

    def existing_only(self) -> Self:
        """A sink's options for ``clickflow dlq``, which reads and replays into what is there: with
        none that make a dataset or a table on opening (a mistyped name would be made, and read
        empty). Those of a sink that creates nothing are themselves."""
        return self

    def nothing_stored(self) -> str | None:
        """A sink's: why it can hold nothing yet (its database file does not exist), known without
        opening it, or None: ``clickflow dlq`` then says so rather than make an empty one to read."""
        return None

    def write_spacing(self) -> timedelta | None:
        """A sink's: the time it keeps between writes under steady load (a quota), or None. A
        pipeline is refused where this is not below a source's ``answer_within``."""
        return None

    def answering_hint(self) -> str | None:
        """A sink's: why its settings would slow a source whose senders wait for their answers (one
        with ``answer_within``), and what to set instead; None if they do not. A pipeline pairing the
        two is valid, and warned."""
        return None


class OptionGroup(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """Base of a group of options (``batch:``, ``retry:``, ``monitor:``, an alert): unknown keys are
    errors, and it is frozen, so that one instance can be every component's default. Subclasses
    repeat ``frozen=True, kw_only=True``: type checkers read ``frozen`` per class, and msgspec
    applies ``kw_only`` to each class's own fields."""


class BatchLimits(OptionGroup, frozen=True, kw_only=True):
    """A sink is handed a batch once any of these limits is reached."""

    max_rows: PositiveInt = 50_000
    max_bytes: ByteSize = ByteSize(16 * 1024 * 1024)
    max_age: Duration = Duration(seconds=1)


class RetryPolicy(OptionGroup, frozen=True, kw_only=True):
    """How often a failing write is retried before its messages are given up."""

    attempts: PositiveInt = 5
    initial_backoff: Duration = Duration(milliseconds=200)
    max_backoff: Duration = Duration(seconds=10)
    give_up_after: Duration = Duration(minutes=5)
    """With redelivering sources a failed batch is handed back and the sink tried again
    with the next one; the run fails once the sink has not succeeded for this long."""


class SourceOptions(PluginOptions, kw_only=True):
    pass


class SinkOptions(PluginOptions, kw_only=True):
    batch: BatchLimits = BatchLimits()
    retry: RetryPolicy = RetryPolicy()


OptionsT = TypeVar("OptionsT", bound=msgspec.Struct)


class OptionsError(ValueError):
    """Options that do not validate: ``loc`` is where (keys and list indexes), ``problem`` what."""

    def __init__(self, loc: Loc, problem: str) -> None:
        super().__init__(f"{'.'.join(map(str, loc))}: {problem}" if loc else problem)
        self.loc = loc
        self.problem = problem


def validate_options(cls: type[OptionsT], data: Any) -> OptionsT:
    """``data`` (plain values, as YAML gives them) as ``cls``, or ``OptionsError``.

    A struct-valued option given as a mapping changes only the keys given: ``batch: {max_rows: 10}``
    keeps the sink's own other limits.
    """
    if isinstance(data, dict):
        data = _over_defaults(cls, data)
    try:
        return msgspec.convert(data, cls, strict=False, dec_hook=_decode)
    except msgspec.ValidationError as exc:
        raise _located(str(exc), cls) from None


def _over_defaults(cls: type[msgspec.Struct], data: dict[str, Any]) -> dict[str, Any]:
    merged = dict(data)
    for field in msgspec.structs.fields(cls):
        value = data.get(field.encode_name)
        if isinstance(value, dict) and isinstance(field.default, msgspec.Struct):
            merged[field.encode_name] = {**msgspec.structs.asdict(field.default), **value}
    return merged


_AT = re.compile(r"^(?P<message>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.DOTALL)
_PART = re.compile(r"\.([^.\[]+)|\[(\d+)\]")
_UNKNOWN = re.compile(r"^Object contains unknown field `(.*)`$")
_MISSING = re.compile(r"^Object missing required field `(.*)`$")
_NOT_A_CHOICE = re.compile(r"^Invalid enum value (.*)$")


def _located(text: str, cls: type) -> OptionsError:
    """msgspec's ``message - at `$.a[0].b``` as a location and a message in the house style."""
    found = _AT.match(text)
    assert found is not None  # the pattern matches any text
    message, path = found.group("message"), found.group("path") or ""
    loc: Loc = tuple(int(index) if index else key for key, index in _PART.findall(path))
    if unknown := _UNKNOWN.match(message):
        return OptionsError((*loc, unknown.group(1)), "unknown option")
    if missing := _MISSING.match(message):
        return OptionsError((*loc, missing.group(1)), "required")
    if (wrong := _NOT_A_CHOICE.match(message)) and (choices := _choices(cls, loc)):
        return OptionsError(loc, f"expected one of {', '.join(map(repr, choices))}, got {wrong.group(1)}")
    message = message.replace("`array`", "a list").replace("`object`", "a mapping")
    message = message.replace("`", "").replace(" | null", "")
    return OptionsError(loc, message[:1].lower() + message[1:])


def _choices(cls: type, loc: Loc) -> tuple[Any, ...]:
    """The values the ``Literal`` option at ``loc`` in ``cls`` takes (none if it is not one)."""
    from msgspec import inspect

    info: inspect.Type | None = inspect.type_info(cls)
    for part in loc:
        info = _one_type(info)
        if isinstance(info, inspect.StructType) and isinstance(part, str):
            info = next((field.type for field in info.fields if field.encode_name == part), None)
        elif isinstance(info, inspect.ListType | inspect.SetType | inspect.VarTupleType) and isinstance(part, int):
            info = info.item_type
        else:
            return ()
    info = _one_type(info)
    return info.values if isinstance(info, inspect.LiteralType) else ()


def _one_type(info: Any) -> Any:
    """The type an optional option holds when set (``X | None`` is ``X``)."""
    from msgspec import inspect

    if isinstance(info, inspect.UnionType):
        types = [member for member in info.types if not isinstance(member, inspect.NoneType)]
        return types[0] if len(types) == 1 else info
    return info
