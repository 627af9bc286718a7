"""Finds plugins through the ``clickflow`` entry-point group and collects what they register.

Built-in plugins are installed entry points too, so they load exactly like a
third-party package. The manager is built by a function, never at import time.
A plugin may register a type by name and import path instead of a class: its
module is imported only when a pipeline uses that type (``Registered.cls``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

import pluggy

from clickflow import hookspecs
from clickflow.api import AnySink, AnySource, Sink, Source

ENTRY_POINT_GROUP = "clickflow"


class PluginError(Exception):
    """A plugin could not be loaded or registered something invalid."""


C = TypeVar("C", bound=AnySource | AnySink)


class Registered(Generic[C]):
    """One source or sink type: its class, or where to import it from when a pipeline first uses it."""

    __slots__ = ("_cls", "_kind", "distribution", "ref", "type_name")

    def __init__(
        self, type_name: str, distribution: str, kind: type[Any], cls: type[C] | None, ref: str | None
    ) -> None:
        self.type_name, self.distribution, self.ref = type_name, distribution, ref
        self._kind, self._cls = kind, cls

    @property
    def cls(self) -> type[C]:
        """The class; a lazily registered one is imported (and checked) here, once."""
        if self._cls is None:
            assert self.ref is not None
            module, _, attribute = self.ref.partition(":")
            try:
                loaded = getattr(importlib.import_module(module), attribute)
            except Exception as exc:
                raise PluginError(
                    f"{self.distribution}: cannot load {self.type_name!r} from {self.ref}: {exc}"
                ) from exc
            self._cls = _checked(loaded, self._kind, self.distribution, self.type_name)
        return self._cls

    def same_as(self, other: Registered[C]) -> bool:
        return (self.ref, self._cls) == (other.ref, other._cls)


@dataclass
class Registry:
    """Every source and sink type known to this process, by type name."""

    manager: pluggy.PluginManager
    sources: dict[str, Registered[AnySource]] = field(default_factory=dict)
    sinks: dict[str, Registered[AnySink]] = field(default_factory=dict)

    def source(self, type_name: str) -> type[AnySource]:
        return self.sources[type_name].cls

    def sink(self, type_name: str) -> type[AnySink]:
        return self.sinks[type_name].cls


def _checked(cls: object, kind: type[Any], distribution: str, type_name: str | None) -> type[Any]:
    if not (isinstance(cls, type) and issubclass(cls, kind)):
        raise PluginError(f"{distribution}: {cls!r} is not a {kind.__name__} subclass")
    name = getattr(cls, "type_name", None)
    if not name:
        raise PluginError(f"{distribution}: {cls.__name__} has no type_name")
    if type_name is not None and name != type_name:
        raise PluginError(
            f"{distribution}: {cls.__name__} is registered as {type_name!r} but its type_name is {name!r}"
        )
    if getattr(cls, "Options", None) is None:
        raise PluginError(f"{distribution}: {cls.__name__} names no options: declare it as {kind.__name__}[ItsOptions]")
    return cls


def _collector(table: dict[str, Registered[C]], kind: type[Any], distribution: str) -> hookspecs.Register[C]:
    def register(plugin: type[C] | str, type_name: str | None = None, /) -> None:
        if isinstance(plugin, str):
            if not type_name or plugin.count(":") != 1:
                raise PluginError(f"{distribution}: register({plugin!r}, ...) takes 'module:Class' and its type name")
            entry: Registered[C] = Registered(type_name, distribution, kind, None, plugin)
        else:
            cls = _checked(plugin, kind, distribution, type_name)
            entry = Registered(cls.type_name, distribution, kind, cls, None)
        existing = table.get(entry.type_name)
        if existing is not None and not existing.same_as(entry):
            raise PluginError(
                f"{kind.__name__.lower()} type {entry.type_name!r} is registered by both {existing.distribution} "
                f"and {distribution}"
            )
        table[entry.type_name] = entry

    return register


def load_plugins(extra: list[tuple[object, str]] | None = None) -> Registry:
    """Load every installed plugin (plus ``extra`` (plugin, distribution) pairs, for tests)."""
    manager = pluggy.PluginManager(ENTRY_POINT_GROUP)
    manager.add_hookspecs(hookspecs)
    distributions: dict[int, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            plugin = ep.load()
        except Exception as exc:
            raise PluginError(f"cannot load plugin {ep.name!r} ({ep.value}): {exc}") from exc
        if manager.is_registered(plugin):
            continue
        manager.register(plugin, name=ep.name)
        distributions[id(plugin)] = ep.dist.name if ep.dist else ep.name
    for plugin, distribution in extra or []:
        manager.register(plugin)
        distributions[id(plugin)] = distribution
    manager.check_pending()

    registry = Registry(manager)
    for impl in manager.hook.register_sources.get_hookimpls():
        distribution = distributions.get(id(impl.plugin), "?")
        impl.function(register=_collector(registry.sources, Source, distribution))
    for impl in manager.hook.register_sinks.get_hookimpls():
        distribution = distributions.get(id(impl.plugin), "?")
        impl.function(register=_collector(registry.sinks, Sink, distribution))
    return registry
