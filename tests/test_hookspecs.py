"""Every hook a plugin can implement is documented, in the code and in ARCHITECTURE.md."""

from __future__ import annotations

import inspect

from clickflow import hookspecs
from tests.conftest import REPO

HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]


def test_there_are_hooks() -> None:
    assert HOOKS == ["register_commands", "register_sinks", "register_sources"]


def test_every_hook_has_a_docstring_and_is_described_in_the_architecture() -> None:
    architecture = (REPO / "ARCHITECTURE.md").read_text()
    for name in HOOKS:
        assert (getattr(hookspecs, name).__doc__ or "").strip(), name
        assert f"`{name}`" in architecture, name
