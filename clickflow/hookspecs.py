"""The registration hooks a clickflow plugin may implement.

Hooks run once, at startup. Per-message work never goes through pluggy: a
registered class is instantiated and its ordinary async methods are called.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    import click

    from clickflow.api import AnySink, AnySource

hookspec = pluggy.HookspecMarker("clickflow")
hookimpl = pluggy.HookimplMarker("clickflow")


@hookspec
def register_sources(register: Callable[[type[AnySource]], None]) -> None:
    """Register source classes by calling ``register(SourceClass)``."""


@hookspec
def register_sinks(register: Callable[[type[AnySink]], None]) -> None:
    """Register sink classes by calling ``register(SinkClass)``."""


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``clickflow`` command line."""
