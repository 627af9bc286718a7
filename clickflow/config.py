"""Pipeline YAML to typed, validated models, with ``FILE:LINE: field: message`` errors.

Every source and sink item names its plugin with ``type:``; the rest of the item
is validated by that plugin's ``Options`` model, which rejects unknown keys.
``${VAR}`` and ``${VAR:-default}`` are replaced from the environment in every
value before validation; ``$${`` writes a literal ``${``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from clickflow.api import Duration, PluginOptions, Sink, Source
from clickflow.plugins import Registry

_VARIABLE = re.compile(r"\$(\$)?\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

Loc = tuple[str | int, ...]


class MonitorOptions(PluginOptions):
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)


class RuntimeOptions(PluginOptions):
    shutdown_timeout: Duration = timedelta(seconds=30)
    """How long SIGINT/SIGTERM waits for in-flight messages to be written and acknowledged."""
    channel_capacity: PositiveInt = 4
    """Batches queued between stages; small, so a slow sink slows the sources."""
    heartbeat_max_age: Duration = timedelta(seconds=60)
    """``/healthz`` fails when a running source has not reported for this long."""


class _PipelineFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sources: list[dict[str, Any]] = Field(min_length=1)
    sinks: list[dict[str, Any]] = Field(min_length=1)
    monitor: MonitorOptions | None = None
    runtime: RuntimeOptions = RuntimeOptions()


@dataclass(frozen=True)
class Component:
    """One configured source or sink: its plugin class, unique name and validated options."""

    cls: type[Source] | type[Sink]
    name: str
    options: PluginOptions


@dataclass(frozen=True)
class Pipeline:
    path: str
    sources: list[Component]
    sinks: list[Component]
    monitor: MonitorOptions | None
    runtime: RuntimeOptions


@dataclass(frozen=True)
class Problem:
    path: str
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line else self.path
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


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


class _Document:
    """YAML text turned into plain data plus the line of every key and item."""

    def __init__(self, path: str, text: str, environ: Mapping[str, str]) -> None:
        self.path = path
        self.lines: dict[Loc, int] = {}
        self.problems: list[Problem] = []
        self._environ = environ
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            self.data = self._build(loader, node, ()) if node is not None else None
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark
            line = mark.line + 1 if mark else None
            raise ConfigError([Problem(path, line, "", f"invalid YAML: {exc.problem}")]) from None
        finally:
            loader.dispose()

    def line(self, loc: Loc) -> int | None:
        while loc and loc not in self.lines:
            loc = loc[:-1]
        return self.lines.get(loc)

    def problem(self, loc: Loc, message: str) -> Problem:
        return Problem(self.path, self.line(loc), _field_name(loc), message)

    def _build(self, loader: yaml.SafeLoader, node: yaml.Node, loc: Loc) -> Any:
        self.lines.setdefault(loc, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            result = {}
            for key_node, value_node in node.value:
                key = loader.construct_object(key_node)
                self.lines[(*loc, key)] = key_node.start_mark.line + 1
                result[key] = self._build(loader, value_node, (*loc, key))
            return result
        if isinstance(node, yaml.SequenceNode):
            return [self._build(loader, item, (*loc, i)) for i, item in enumerate(node.value)]
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
    doc: _Document, kind: str, index: int, item: Any, known: Mapping[str, Any]
) -> tuple[str, Component] | None:
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
    cls = known[type_name].cls
    try:
        validated = cls.Options.model_validate(options)
    except ValidationError as exc:
        for error in exc.errors():
            field_loc = (*loc, *error["loc"])
            message = "unknown option" if error["type"] == "extra_forbidden" else error["msg"]
            doc.problems.append(doc.problem(field_loc, message))
        return None
    return str(name or type_name), Component(cls, str(name or type_name), validated)


def _unique(components: list[tuple[str, Component]], explicit: set[str]) -> list[Component]:
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
    try:
        top = _PipelineFile.model_validate(doc.data)
    except ValidationError as exc:
        for error in exc.errors():
            message = "unknown section" if error["type"] == "extra_forbidden" else error["msg"]
            doc.problems.append(doc.problem(tuple(error["loc"]), message))
        raise ConfigError(doc.problems) from None

    built: dict[str, list[tuple[str, Component]]] = {"source": [], "sink": []}
    explicit: set[str] = set()
    for kind, items, known in (("source", top.sources, registry.sources), ("sink", top.sinks, registry.sinks)):
        for index, item in enumerate(items):
            result = _component(doc, kind, index, item, known)
            if result is None:
                continue
            if "name" in item:
                if result[0] in explicit:
                    doc.problems.append(doc.problem((f"{kind}s", index, "name"), f"name {result[0]!r} is used twice"))
                explicit.add(result[0])
            built[kind].append(result)
    if doc.problems:
        raise ConfigError(doc.problems)
    return Pipeline(
        path=path,
        sources=_unique(built["source"], explicit),
        sinks=_unique(built["sink"], explicit),
        monitor=top.monitor,
        runtime=top.runtime,
    )


def load_pipeline(path: str | Path, registry: Registry, environ: Mapping[str, str] | None = None) -> Pipeline:
    """Read and validate a pipeline file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(str(path), None, "", f"cannot read pipeline: {exc.strerror}")]) from None
    return parse_pipeline(text, registry, str(path), environ)
