"""Finds plugins through the ``clickflow`` entry-point group and collects what they register.

Built-in plugins are installed entry points too, so they load exactly like a
third-party package. The manager is built by a function, never at import time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Generic, TypeVar

import pluggy

from clickflow import hookspecs
from clickflow.api import AnySink, AnySource, Sink, Source

ENTRY_POINT_GROUP = "clickflow"


class PluginError(Exception):
    """A plugin could not be loaded or registered something invalid."""


C = TypeVar("C", bound=AnySource | AnySink)


@dataclass(frozen=True, slots=True)
class Registered(Generic[C]):
    cls: type[C]
    distribution: str


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


def _collector(table: dict[str, Registered[C]], base: type[C], distribution: str) -> Callable[[type[C]], None]:
    def register(cls: type[C]) -> None:
        if not (isinstance(cls, type) and issubclass(cls, base)):
            raise PluginError(f"{distribution}: {cls!r} is not a {base.__name__} subclass")
        name = getattr(cls, "type_name", None)
        if not name:
            raise PluginError(f"{distribution}: {cls.__name__} has no type_name")
        if getattr(cls, "Options", None) is None:
            kind = base.__name__
            raise PluginError(f"{distribution}: {cls.__name__} names no options: declare it as {kind}[ItsOptions]")
        if name in table and table[name].cls is not cls:
            other = table[name].distribution
            raise PluginError(f"{base.__name__.lower()} type {name!r} is registered by both {other} and {distribution}")
        table[name] = Registered(cls, distribution)

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
