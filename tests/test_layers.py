"""The pure modules stay pure: no event loop, no socket, no subprocess, no I/O library, in them
or in any project module they import (what import-linter cannot say of the standard library)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PURE = [
    "tpproxy.routing",
    "tpproxy.config",
    "tpproxy.http.framing",
    "tpproxy.http.request",
    "tpproxy.http.h2_streams",
    "tpcontrol.kube.agentconfig",
    "tpcontrol.injector.podpatch",
    "tpcontrol.manager.state",
]
IMPURE = {"asyncio", "socket", "subprocess", "aiohttp", "uvloop", "kubernetes_asyncio", "selectors"}


def _file(module: str) -> Path | None:
    base = SRC / module.replace(".", "/")
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _imports(module: str) -> set[str]:
    """Every module name `module`'s own source imports (function-level imports included)."""
    path = _file(module)
    assert path is not None, module
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            found |= {
                f"{name}.{alias.name}" for alias in node.names if _file(f"{name}.{alias.name}")
            }
    return found


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """The nodes that run: `if TYPE_CHECKING:` blocks are for the type checker only."""
    nodes: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        for child in ast.iter_child_nodes(node):
            if (
                isinstance(child, ast.If)
                and isinstance(child.test, ast.Name)
                and child.test.id == "TYPE_CHECKING"
            ):
                todo.extend(child.orelse)
                continue
            todo.append(child)
    return nodes


def _closure(module: str) -> dict[str, str]:
    """External modules reached from `module` through project modules: name -> who imports it."""
    seen: set[str] = set()
    external: dict[str, str] = {}
    todo = [module]
    while todo and len(seen) < 500:  # bounded: the project has far fewer modules
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in _imports(current):
            if name.split(".")[0] in ("tpproxy", "tpcontrol"):
                if _file(name) is not None:
                    todo.append(name)
            else:
                external.setdefault(name.split(".")[0], current)
    return external


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_reaches_no_io(module: str) -> None:
    reached = _closure(module)
    bad = {name: via for name, via in reached.items() if name in IMPURE}
    assert bad == {}, f"{module} reaches {bad} (module -> the project module importing it)"


def test_the_check_sees_an_impure_module() -> None:
    # The agent loop is impure: the walk must find its event loop, or it proves nothing.
    assert "asyncio" in _closure("tpproxy.agent")
