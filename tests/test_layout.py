"""The package's layout rules (CONTRIBUTING.md): no module above 600 lines, no private name of one
module used in another, and no import circle between modules, read from the source itself."""

from __future__ import annotations

import ast
from pathlib import Path

import apl_kernels

PACKAGE = Path(apl_kernels.__file__).resolve().parent
MODULES = sorted(PACKAGE.rglob("*.py"))


def module_name(path: Path) -> str:
    parts = ("apl_kernels",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def absolute(path: Path, node: ast.ImportFrom) -> str:
    """The module an ``from ... import`` names, absolute."""
    if not node.level:
        return node.module or ""
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def imports(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) of every ``from module import name`` of the package in ``path``, and
    (module, "", line) of its plain imports; relative ones made absolute."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = absolute(path, node)
            if module.startswith("apl_kernels"):
                found += [(module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "", node.lineno) for alias in node.names if alias.name.startswith("apl_kernels")]
    return found


def test_no_module_is_above_600_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in MODULES if (n := len(p.read_text().splitlines())) > 600}
    assert not long


def test_no_module_imports_a_private_name_of_another():
    modules = {module_name(p) for p in MODULES}
    private = []
    for path in MODULES:
        for module, name, line in imports(path):
            # `from .pkg import _mod` of a submodule is a module, not a private name of pkg.
            if name.startswith("_") and f"{module}.{name}" not in modules:
                private.append(f"{path.relative_to(PACKAGE)}:{line} imports {module}.{name}")
        tree = ast.parse(path.read_text())
        aliases = {alias.asname or alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and absolute(path, node).startswith("apl_kernels") for alias in node.names
                   if f"{absolute(path, node)}.{alias.name}" in modules}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                private.append(f"{path.relative_to(PACKAGE)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not private


def test_the_modules_import_no_circle():
    """Imports at a module's top level (not those inside functions, which run later) form no cycle."""
    modules = {module_name(p): p for p in MODULES}
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        edges = set()
        for node in top:
            if isinstance(node, ast.ImportFrom):
                base = absolute(path, node)
                for alias in node.names:
                    target = f"{base}.{alias.name}"
                    edges.add(target if target in modules else base)
            else:
                edges |= {alias.name for alias in node.names}
        # A package's __init__ imported on the way to a submodule is not an edge of the module.
        graph[name] = {e for e in edges if e in modules and e != name and not name.startswith(e + ".")}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles
