"""The documentation cannot drift from the code: every hook's documented signature is the hookspec's,
and every option of every built-in plugin is in the README's tables."""

from __future__ import annotations

import inspect
import re

import pytest

from clickflow import hookspecs
from clickflow.plugins import Registered, load_plugins
from tests.conftest import REPO

README = (REPO / "README.md").read_text()
ARCHITECTURE = (REPO / "ARCHITECTURE.md").read_text()
HOOKS = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("register_")]


def documented_signature(name: str) -> str:
    """``def NAME(PARAMETER: TYPE) -> RETURN:`` as the hookspec declares it."""
    signature = inspect.signature(getattr(hookspecs, name))
    parameters = ", ".join(f"{p.name}: {p.annotation}" for p in signature.parameters.values())
    return f"def {name}({parameters}) -> {signature.return_annotation}:"


def test_there_are_hooks() -> None:
    assert HOOKS == ["register_commands", "register_sinks", "register_sources"]


@pytest.mark.parametrize("name", HOOKS)
def test_every_hook_is_documented_with_the_hookspecs_signature_and_docstring(name: str) -> None:
    docstring = (getattr(hookspecs, name).__doc__ or "").strip()
    assert docstring
    documented = f'@hookimpl\n{documented_signature(name)}\n    """{docstring}"""'
    assert documented in README, f"the README's hook for {name} differs from the hookspec:\n{documented}"
    assert f"`{name}`" in ARCHITECTURE


def built_in_plugins() -> list[tuple[str, Registered]]:  # type: ignore[type-arg]
    registry = load_plugins()
    tables = [*registry.sources.items(), *registry.sinks.items()]
    return [(name, registered) for name, registered in tables if registered.distribution == "clickflow"]


@pytest.mark.parametrize(("type_name", "registered"), built_in_plugins(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_option_of_every_built_in_plugin_is_in_the_readme(type_name: str, registered: Registered) -> None:  # type: ignore[type-arg]
    pipelines = README[README.index("## Pipelines") : README.index("### The live dashboard")]
    rows = [line for line in pipelines.splitlines() if line.startswith(f"| `{type_name}` |")]
    assert rows, f"the README has no table row for {type_name!r}"
    (row,) = rows
    documented = set(re.findall(r"`(\w+)`", row))
    missing = sorted(set(registered.cls.Options.__struct_fields__) - documented)
    assert not missing, f"{type_name}: options missing from the README's table: {missing}"


def test_the_example_plugin_uses_only_clickflows_public_face() -> None:
    import ast

    import clickflow

    example = REPO / "plugins" / "clickflow-example-sink" / "clickflow_example_sink" / "__init__.py"
    imported = {
        (node.module, alias.name)
        for node in ast.walk(ast.parse(example.read_text()))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("clickflow")
        for alias in node.names
    }
    assert imported and {module for module, _ in imported} == {"clickflow"}
    assert {name for _, name in imported} <= set(clickflow.__all__)
