"""Pipeline YAML to typed, validated models, with ``FILE:LINE: field: message`` errors.

Every source and sink item names its plugin with ``type:``; the rest of the item
is validated by that plugin's ``Options`` model, which rejects unknown keys.
``${VAR}`` and ``${VAR:-default}`` are replaced from the environment in every
value before validation; ``$${`` writes a literal ``${``.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Generic, Literal, TypeVar

import msgspec
import yaml
from msgspec import Meta

from clickflow.api import AnySink, AnySource
from clickflow.options import (
    ByteSize,
    Duration,
    Loc,
    OptionGroup,
    OptionsError,
    PluginOptions,
    PositiveInt,
    check_range,
    validate_options,
)
from clickflow.parser import MAX_MESSAGE_BYTES
from clickflow.plugins import PluginError, Registered, Registry

_VARIABLE = re.compile(r"\$(\$)?\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class MonitorOptions(OptionGroup, frozen=True, kw_only=True):
    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    idle_timeout: Duration = Duration(seconds=75)
    """A connection that has not sent a whole request for this long is closed (slow clients)."""
    max_connections: PositiveInt | None = None
    """Connections open at once, all routes together; a new one past it is answered 503 and closed.
    None: 1,024, or half the process's open-file limit less 128 if that is less (see ``monitor``)."""

    def __post_init__(self) -> None:  # 0 turns the timer off: a connection that sends nothing is held for ever
        check_range("idle_timeout", self.idle_timeout, timedelta(milliseconds=1))


class RuntimeOptions(OptionGroup, frozen=True, kw_only=True):
    shutdown_timeout: Duration = Duration(seconds=30)
    """How long SIGINT/SIGTERM waits for in-flight messages to be written and acknowledged."""
    channel_capacity: PositiveInt = 4
    """Batches queued between stages; small, so a slow sink slows the sources."""
    heartbeat_max_age: Duration = Duration(seconds=60)
    """``/healthz`` fails when a running source has not reported for this long."""
    max_message_bytes: ByteSize = ByteSize(MAX_MESSAGE_BYTES)
    """A larger message becomes a ``too_large`` dead letter holding its head, size and hash.
    At most 10 MiB, so that every row a message yields fits in every sink."""
    event_loop: Literal["auto", "uvloop", "asyncio"] = "auto"
    """``uvloop`` (installed with clickflow, except on Windows) answers push requests with about a
    tenth less CPU each; ``asyncio`` is Python's own loop; ``auto`` is uvloop where installed."""

    def __post_init__(self) -> None:
        check_range("max_message_bytes", self.max_message_bytes, 1, MAX_MESSAGE_BYTES)
        check_range("heartbeat_max_age", self.heartbeat_max_age, timedelta(seconds=1))  # 0: /healthz always fails
        if self.event_loop == "uvloop" and not uvloop_installed():
            raise ValueError("event_loop: uvloop is not installed (pip install uvloop; it has no Windows build)")


def uvloop_installed() -> bool:
    return importlib.util.find_spec("uvloop") is not None


C = TypeVar("C", bound=AnySource | AnySink)


@dataclass(frozen=True)
class Component(Generic[C]):
    """One configured source or sink: its plugin class, unique name and validated options."""

    cls: type[C]
    name: str
    options: PluginOptions

    def build(self) -> C:
        """The source or sink itself, ready to run."""
        return self.cls(self.name, self.options)


@dataclass(frozen=True)
class Pipeline:
    path: str
    sources: list[Component[AnySource]]
    sinks: list[Component[AnySink]]
    monitor: MonitorOptions | None
    runtime: RuntimeOptions
    warnings: list[Problem] = field(default_factory=list)
    """What makes this valid pipeline slow (printed by ``validate``, logged by ``run``)."""


@dataclass(frozen=True)
class Problem:
    path: str
    line: int | None
    field: str
    message: str
    warning: bool = False
    """Valid but slow: the file still runs."""

    def __str__(self) -> str:
        """``FILE:LINE: field: message``, as ``validate`` prints it; a warning's message says ``warning:`` first."""
        return self.text(labelled=True)

    def text(self, labelled: bool) -> str:
        """The problem, and whether a warning says so (``run`` logs warnings at their own level instead)."""
        where = f"{self.path}:{self.line}" if self.line else self.path
        message = f"warning: {self.message}" if labelled and self.warning else self.message
        return f"{where}: {self.field}: {message}" if self.field else f"{where}: {message}"


class ConfigError(Exception):
    """The pipeline file is invalid; ``problems`` lists every issue found."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


def _field_name(loc: Loc) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


MAX_VALUES = 10_000
"""More values than any pipeline needs: a file that expands past this through aliases is refused
(an alias "bomb" would otherwise take exponential time and memory)."""


_PLAIN_TAGS = ("tag:yaml.org,2002:seq", "tag:yaml.org,2002:map")


class _Document:
    """YAML text turned into plain data plus the line of every key and item."""

    def __init__(self, path: str, text: str, environ: Mapping[str, str]) -> None:
        self.path = path
        self.lines: dict[Loc, int] = {}
        self.problems: list[Problem] = []
        self.warnings: list[Problem] = []
        """What makes a valid pipeline slow."""
        self._environ = environ
        self._values = 0
        self._open: set[int] = set()  # nodes being built: meeting one again means a recursive alias
        loader: yaml.SafeLoader | None = None
        try:
            loader = yaml.SafeLoader(text)  # its reader refuses control characters at once
            node = loader.get_single_node()
            self.data = self._build(loader, node, ()) if node is not None else None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            line = mark.line + 1 if mark else None
            raise ConfigError([Problem(path, line, "", f"invalid YAML: {exc.problem}")]) from None
        except yaml.YAMLError as exc:  # the reader's: a control character, say; it counts characters
            position = getattr(exc, "position", None)
            line = text.count("\n", 0, position) + 1 if isinstance(position, int) else None
            raise ConfigError([Problem(path, line, "", f"invalid YAML: {str(exc).splitlines()[0]}")]) from None
        except RecursionError:
            raise ConfigError([Problem(path, None, "", "invalid YAML: nested too deeply")]) from None
        finally:
            if loader is not None:
                loader.dispose()

    def line(self, loc: Loc) -> int | None:
        while loc and loc not in self.lines:
            loc = loc[:-1]
        return self.lines.get(loc)

    def problem(self, loc: Loc, message: str, warning: bool = False) -> Problem:
        return Problem(self.path, self.line(loc), _field_name(loc), message, warning)

    def _fail(self, node: yaml.Node, message: str) -> ConfigError:
        return ConfigError([Problem(self.path, node.start_mark.line + 1, "", message)])

    def _build(self, loader: yaml.SafeLoader, node: yaml.Node, loc: Loc) -> Any:
        self._values += 1
        if self._values > MAX_VALUES:
            raise self._fail(node, f"the pipeline expands to more than {MAX_VALUES} values; are aliases nested?")
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode):
            if node.tag not in _PLAIN_TAGS:
                raise self._fail(node, f"invalid YAML: the tag {node.tag} is not supported here")
            if id(node) in self._open:
                raise self._fail(node, "an alias refers to the value that contains it")
            self._open.add(id(node))
            try:
                return self._build_collection(loader, node, loc)
            finally:
                self._open.discard(id(node))
        return self._build_scalar(loader, node, loc)

    def _build_collection(self, loader: yaml.SafeLoader, node: yaml.Node, loc: Loc) -> Any:
        if isinstance(node, yaml.SequenceNode):
            return [self._build(loader, item, (*loc, i)) for i, item in enumerate(node.value)]
        result: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise self._fail(key_node, "a key must be plain text")
            if key in result:
                first = self.lines[(*loc, key)]
                raise self._fail(key_node, f"{_field_name((*loc, key))} is given twice (first on line {first})")
            self.lines[(*loc, key)] = line
            result[key] = self._build(loader, value_node, (*loc, key))
        return result

    def _build_scalar(self, loader: yaml.SafeLoader, node: yaml.Node, loc: Loc) -> Any:
        if isinstance(node, yaml.ScalarNode) and "$" in node.value:
            node.value = self._interpolate(node.value, loc)
            if node.style is None:  # plain scalar: type it again, so ${PORT} can be an int
                node.tag = loader.resolve(yaml.ScalarNode, node.value, (True, False))  # type: ignore[no-untyped-call]
        return loader.construct_object(node, deep=True)

    def _interpolate(self, text: str, loc: Loc) -> str:
        def substitute(match: re.Match[str]) -> str:
            escaped, name, default = match.groups()
            if escaped:
                return match.group(0)[1:]
            value = self._environ.get(name)
            if value is None or (value == "" and default is not None):
                if default is None:
                    self.problems.append(
                        self.problem(loc, f"environment variable {name} is not set; set it or use ${{{name}:-default}}")
                    )
                    return ""
                return default
            return value

        return _VARIABLE.sub(substitute, text)


def _component(
    doc: _Document, kind: str, index: int, item: Any, known: Mapping[str, Registered[C]]
) -> tuple[str, Component[C]] | None:
    loc: Loc = (f"{kind}s", index)
    if not isinstance(item, dict):
        doc.problems.append(doc.problem(loc, f"each {kind} must be a mapping with a 'type' key"))
        return None
    options = dict(item)
    type_name = options.pop("type", None)
    name = options.pop("name", None)
    if type_name not in known:
        names = ", ".join(sorted(known)) or "none installed"
        what = f"unknown {kind} type {type_name!r}" if type_name else f"{kind} needs a 'type'"
        doc.problems.append(doc.problem((*loc, "type"), f"{what}; known {kind} types: {names}"))
        return None
    try:
        cls = known[type_name].cls
    except PluginError as exc:  # a lazily registered type whose module cannot be imported
        doc.problems.append(doc.problem((*loc, "type"), str(exc)))
        return None
    try:
        validated = validate_options(cls.Options, options)
    except OptionsError as exc:
        doc.problems.append(doc.problem((*loc, *exc.loc), exc.problem))
        return None
    return str(name or type_name), Component(cls, str(name or type_name), validated)


MONITOR_PATHS = ("/metrics", "/healthz", "/readyz")
_Built = dict[str, list[tuple[str, Component[Any]]]]
"""A file's validated sources and sinks by kind (``source``, ``sink``), each with its name, in the
file's order: what the checks across components read."""


def _check_shared(doc: _Document, built: _Built, monitor: Any) -> None:
    """What components must not share (paths on the server, files), and the server they need.
    Runs on a file whose items all validated, so ``built`` lines up with the file's items."""
    owners: dict[str, tuple[Loc, str]] = {f"HTTP path {path}": ((), "the monitoring server") for path in MONITOR_PATHS}
    for kind in ("source", "sink"):
        for index, (name, component) in enumerate(built[kind]):
            loc: Loc = (f"{kind}s", index)
            paths = component.options.http_paths()
            if paths and monitor is None:
                doc.problems.append(
                    doc.problem(loc, f"{kind} {name!r} serves {', '.join(paths)}: add a monitor: section (host, port)")
                )
            for resource in [f"HTTP path {path}" for path in paths] + component.options.exclusive_resources():
                owner_loc, owner = owners.setdefault(resource, (loc, f"{kind} {name!r} on line {doc.line(loc)}"))
                if owner_loc != loc:
                    doc.problems.append(doc.problem(loc, f"{resource} is already used by {owner}; give each its own"))


def _check_answers(doc: _Document, built: _Built) -> None:
    """A sink that keeps more time between writes (a quota) than a source's senders wait for their
    answer would have every message of theirs answered as not stored, sent again, and stored again.
    A sink whose settings merely slow such a source (``answering_hint``) is warned."""
    for index, (sink, sink_component) in enumerate(built["sink"]):
        spacing = sink_component.options.write_spacing()
        hint = sink_component.options.answering_hint()
        for source, source_component in built["source"]:
            wait = source_component.options.answer_within()
            if wait is not None and hint is not None:
                why = f"source {source!r} answers its senders only once their messages are stored, and {hint}"
                doc.warnings.append(doc.problem(("sinks", index), why, warning=True))
            if spacing is None or wait is None or spacing < wait:
                continue
            problem = (
                f"sink {sink!r} keeps {spacing.total_seconds():g}s between writes under steady load, no less than "
                f"source {source!r} waits for its messages to be stored ({wait.total_seconds():g}s): they would "
                "be answered as not stored, sent again and stored again; use a sink that stores sooner, or let "
                "the source wait longer"
            )
            doc.problems.append(doc.problem(("sinks", index), problem))


def _check_ids(doc: _Document, built: _Built) -> None:
    """Sources whose message ids are unique only within something each may have its own of (two
    Pub/Sub sources: two topics) are warned: the sinks key rows on message ids."""
    first: dict[str, int] = {}
    for index, (_, component) in enumerate(built["source"]):
        scope = component.options.ids_unique_within()
        if scope is None:
            continue
        if (other := first.setdefault(scope, index)) != index:
            why = (
                f"its message ids, like those of sources[{other}], are unique within {scope} only, and the sinks "
                "key rows on them: a message from another one with the same id would be taken for a redelivery "
                "and not stored; give each its own pipeline and sinks"
            )
            doc.warnings.append(doc.problem(("sources", index), why, warning=True))


def _check_heartbeats(doc: _Document, built: _Built, runtime: RuntimeOptions) -> None:
    """``/healthz`` must not fail while a healthy source waits: a pull held open on a quiet
    subscription, a throttled simulator between visits."""
    limit = runtime.heartbeat_max_age
    for index, (source, component) in enumerate(built["source"]):
        quiet = component.options.heartbeat_within()
        if quiet is None or quiet < limit:
            continue
        problem = (
            f"source {source!r} may report only every {quiet.total_seconds():g}s while it waits, no sooner than "
            f"runtime.heartbeat_max_age ({limit.total_seconds():g}s): /healthz would fail whenever traffic "
            "pauses; raise heartbeat_max_age"
        )
        doc.problems.append(doc.problem(("sources", index), problem))


def _unique(components: list[tuple[str, Component[C]]], explicit: set[str]) -> list[Component[C]]:
    seen: dict[str, int] = {}
    result = []
    for name, component in components:
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1 and name not in explicit:
            component = Component(component.cls, f"{name}-{seen[name]}", component.options)
        result.append(component)
    return result


def parse_pipeline(
    text: str, registry: Registry, path: str = "<pipeline>", environ: Mapping[str, str] | None = None
) -> Pipeline:
    """Validate pipeline text; raises ConfigError listing every problem."""
    doc = _Document(path, text, os.environ if environ is None else environ)
    if not isinstance(doc.data, dict):
        raise ConfigError([Problem(path, 1, "", "a pipeline is a mapping with 'sources' and 'sinks'")])
    for key in doc.data:
        if key not in SECTIONS:
            doc.problems.append(doc.problem((key,), "unknown section"))
    lists = {kind: _section_list(doc, doc.data, kind) for kind in ("sources", "sinks")}
    monitor = _options_section(doc, doc.data, "monitor", MonitorOptions)
    runtime = _options_section(doc, doc.data, "runtime", RuntimeOptions) or RuntimeOptions()
    explicit: set[str] = set()
    sources = _components(doc, "source", lists["sources"], registry.sources, explicit)
    sinks = _components(doc, "sink", lists["sinks"], registry.sinks, explicit)
    if not doc.problems:
        built: _Built = {"source": list(sources), "sink": list(sinks)}
        _check_shared(doc, built, monitor)
        _check_answers(doc, built)
        _check_ids(doc, built)
        _check_heartbeats(doc, built, runtime)
    if doc.problems:
        raise ConfigError(doc.problems)
    return Pipeline(
        path=path,
        sources=_unique(sources, explicit),
        sinks=_unique(sinks, explicit),
        monitor=monitor,
        runtime=runtime,
        warnings=doc.warnings,
    )


SECTIONS = ("sources", "sinks", "monitor", "runtime")
S = TypeVar("S", bound=msgspec.Struct)


def _section_list(doc: _Document, data: dict[str, Any], kind: str) -> list[Any]:
    """``sources:`` or ``sinks:``: a list of at least one item."""
    items = data.get(kind)
    if items is None:
        doc.problems.append(doc.problem((kind,), f"required: a list of at least one {kind[:-1]}"))
    elif not isinstance(items, list):
        doc.problems.append(doc.problem((kind,), f"must be a list of {kind}"))
    elif not items:
        doc.problems.append(doc.problem((kind,), f"needs at least one {kind[:-1]}"))
    else:
        return items
    return []


def _options_section(doc: _Document, data: dict[str, Any], key: str, cls: type[S]) -> S | None:
    """``monitor:`` or ``runtime:``, validated; None when absent (or empty) or invalid (a problem is
    recorded)."""
    if data.get(key) is None:
        return None
    try:
        return validate_options(cls, data[key])
    except OptionsError as exc:
        doc.problems.append(doc.problem((key, *exc.loc), exc.problem))
        return None


def _components(
    doc: _Document, kind: str, items: list[Any], known: Mapping[str, Registered[C]], explicit: set[str]
) -> list[tuple[str, Component[C]]]:
    """The items of one section that validate, by name; ``explicit`` gathers the names given."""
    built = []
    for index, item in enumerate(items):
        result = _component(doc, kind, index, item, known)
        if result is None:
            continue
        if "name" in item:
            if result[0] in explicit:
                doc.problems.append(doc.problem((f"{kind}s", index, "name"), f"name {result[0]!r} is used twice"))
            explicit.add(result[0])
        built.append(result)
    return built


def load_pipeline(path: str | Path, registry: Registry, environ: Mapping[str, str] | None = None) -> Pipeline:
    """Read and validate a pipeline file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([Problem(str(path), None, "", f"cannot read pipeline: {exc.strerror}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        problem = Problem(str(path), line, "", f"not UTF-8 text (byte {exc.start}); save the file as UTF-8")
        raise ConfigError([problem]) from None
    return parse_pipeline(text, registry, str(path), environ)
