"""The registration hooks a clickflow plugin may implement.

Hooks run once, at startup. Per-message work never goes through pluggy: a
registered class is instantiated and its ordinary async methods are called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, TypeVar

import pluggy

if TYPE_CHECKING:
    import click

    from clickflow.api import AnySink, AnySource

hookspec = pluggy.HookspecMarker("clickflow")
hookimpl = pluggy.HookimplMarker("clickflow")


P = TypeVar("P", contravariant=True)


class Register(Protocol[P]):
    """``register(PluginClass)``, or ``register("package.module:PluginClass", "type_name")`` to import
    the module only when a pipeline uses that type."""

    def __call__(self, plugin: type[P] | str, type_name: str | None = None, /) -> None: ...


@hookspec
def register_sources(register: Register[AnySource]) -> None:
    """Register source classes: ``register(SourceClass)`` or ``register("module:Class", "type")``."""


@hookspec
def register_sinks(register: Register[AnySink]) -> None:
    """Register sink classes: ``register(SinkClass)`` or ``register("module:Class", "type")``."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``clickflow`` command line."""
