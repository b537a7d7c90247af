"""The package's import structure, read from the source (ast, nothing imported): no module imports another module's
private names, no import cycle among the package's modules at module level, and no file over 600 lines.

Imports inside functions are allowed; those that would close a cycle if they were at module level are listed in
``DEFERRED`` below, so a new one is a decision, not an accident."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "hf_otfusion"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 600

# (importer, imported): imports inside a function that would close an import cycle at module level, each an edge
# from a module to one that (indirectly) imports it, with why; keep the list exact (the test says what to change).
DEFERRED: dict[tuple[str, str], str] = {
    ("hf_otfusion.card", "hf_otfusion"): "__version__, defined by the package after it imports its modules",
    ("hf_otfusion.plan_cache", "hf_otfusion"): "__version__ (as card)",
    ("hf_otfusion.evaluate", "hf_otfusion.fuse"): "ensemble and vanilla_average; fuse imports evaluate.logits_of",
    ("hf_otfusion.matching", "hf_otfusion.engine"): "the engine's aligner; the engine imports matching",
}


@dataclass(frozen=True)
class Import:
    """One imported name: ``module`` (the importer) takes ``name`` from ``source`` (``name`` None: ``import
    source``) on ``line``; ``when`` it runs: at import (``"module"``), when a function is called (``"function"``) or
    never (``"typing"``: under ``if TYPE_CHECKING:``)."""

    module: str
    source: str
    name: str | None
    line: int
    when: str


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__.py``)."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = module_files()


def _is_package(module: str) -> bool:
    return MODULES[module].name == "__init__.py"


def _resolve(module: str, level: int, target: str | None) -> str:
    """The absolute name of a relative import's ``from`` part."""
    if level == 0:
        return target or ""
    base = module.split(".") if _is_package(module) else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join([*base, target] if target else base)


_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)


def _nodes(tree: ast.AST, when: str = "module") -> Iterator[tuple[ast.AST, str]]:
    """Every node with when it runs (see ``Import.when``)."""
    for node in ast.iter_child_nodes(tree):
        if when == "module" and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                yield child, "typing"
                yield from _nodes(child, "typing")
            for child in node.orelse:
                yield child, when
                yield from _nodes(child, "function" if isinstance(child, _FUNCTIONS) else when)
            continue
        yield node, when
        yield from _nodes(node, "function" if when == "module" and isinstance(node, _FUNCTIONS) else when)


def imports_of(module: str) -> list[Import]:
    """The imports of one module that name a module of the package."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    found = []
    for node, when in _nodes(tree):
        if isinstance(node, ast.ImportFrom):
            source = _resolve(module, node.level, node.module)
            if source == PACKAGE or source.startswith(PACKAGE + "."):
                found += [Import(module, source, a.name, node.lineno, when) for a in node.names]
        elif isinstance(node, ast.Import):
            found += [Import(module, a.name, None, node.lineno, when) for a in node.names
                      if a.name == PACKAGE or a.name.startswith(PACKAGE + ".")]
    return found


ALL_IMPORTS = [imp for module in MODULES for imp in imports_of(module)]


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _own_package_reexport(imp: Import) -> bool:
    """A package's ``__init__`` taking a name from one of its own modules (the way it makes it public)."""
    return _is_package(imp.module) and imp.source.startswith(imp.module + ".")


def _private_module_of_package(imp: Import) -> bool:
    """A private module (``_compat``) imported, or a name taken from it, inside the package that holds it."""
    full = f"{imp.source}.{imp.name}" if imp.name and f"{imp.source}.{imp.name}" in MODULES else imp.source
    parts = full.split(".")
    private_at = next((i for i, p in enumerate(parts) if _private(p)), None)
    if private_at is None:
        return False
    return imp.module.startswith(".".join(parts[:private_at]) + ".") or imp.module == ".".join(parts[:private_at])


def _attribute_uses(module: str) -> list[tuple[str, str, int]]:
    """``alias._name`` where ``alias`` is a module of the package bound by an import (``import hf_otfusion.x as
    y``, ``from hf_otfusion import x``): a private name reached through the module object."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    aliases: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name in MODULES and a.asname:
                    aliases[a.asname] = a.name
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(module, node.level, node.module)
            for a in node.names:
                if f"{source}.{a.name}" in MODULES:
                    aliases[a.asname or a.name] = f"{source}.{a.name}"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and _private(node.attr):
            found.append((aliases[node.value.id], node.attr, node.lineno))
    return found


def private_imports() -> list[str]:
    """``importer:line imports source.name`` for every private name one module takes from another."""
    bad = []
    for imp in ALL_IMPORTS:
        if imp.name is None or not _private(imp.name) or imp.source == imp.module:
            continue
        if _own_package_reexport(imp) or _private_module_of_package(imp):
            continue
        bad.append(f"{imp.module}:{imp.line} imports {imp.source}.{imp.name}")
    for module in MODULES:
        for source, name, line in _attribute_uses(module):
            if source != module:
                bad.append(f"{module}:{line} uses {source}.{name}")
    return sorted(set(bad))


def _targets(imp: Import) -> list[str]:
    """The package modules an import needs: the submodule when the name is one, and the ``from`` module (a package
    the importer lies in only for a name it defines: its ``__init__`` is otherwise imported before the importer
    anyway, as every parent package is, and ``from . import core`` needs only ``core``)."""
    submodule = f"{imp.source}.{imp.name}" if imp.name is not None else None
    found = [submodule] if submodule in MODULES else []
    ancestor = imp.module.startswith(imp.source + ".")
    if imp.source in MODULES and not (ancestor and found):
        found.append(imp.source)
    return found


def module_graph() -> dict[str, set[str]]:
    """Module-level import edges among the package's modules (a package's parents, imported implicitly, left
    out: every module would then import ``hf_otfusion/__init__``, which imports them)."""
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for imp in ALL_IMPORTS:
        if imp.when == "module":
            graph[imp.module].update(t for t in _targets(imp) if t != imp.module)
    return graph


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (each an import cycle), sorted."""
    reach = {m: _reachable(graph, m) for m in graph}
    comps = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in graph if m in reach[m]}
    return sorted(sorted(c) for c in comps)


def deferred_cycle_edges() -> set[tuple[str, str]]:
    """Imports inside functions that would close a cycle at module level: the imported module imports the
    importer, directly or not."""
    graph = module_graph()
    reach = {m: _reachable(graph, m) for m in graph}
    return {(imp.module, t) for imp in ALL_IMPORTS if imp.when == "function" for t in _targets(imp)
            if t != imp.module and (imp.module in reach[t])}


def test_the_walk_sees_the_package():
    assert {"hf_otfusion", "hf_otfusion.fuse", "hf_otfusion.trace", "hf_otfusion.trace.core"} <= set(MODULES)
    assert any(i.module == "hf_otfusion" and i.source == "hf_otfusion.fuse" and i.name == "fuse"
               for i in ALL_IMPORTS)
    assert _resolve("hf_otfusion.trace.core", 2, "plan") == "hf_otfusion.plan"
    assert _resolve("hf_otfusion.trace", 1, "core") == "hf_otfusion.trace.core"
    assert _resolve("hf_otfusion", 1, None) == "hf_otfusion"


def test_what_the_checks_count():
    assert _private("_x") and not _private("__version__") and not _private("x")
    assert _own_package_reexport(Import("hf_otfusion.trace", "hf_otfusion.trace.core", "_Atoms", 1, "module"))
    across = Import("hf_otfusion.fuse", "hf_otfusion.trace.core", "_Atoms", 1, "module")
    assert not _own_package_reexport(across) and not _private_module_of_package(across)
    assert _private_module_of_package(Import("hf_otfusion", "hf_otfusion", "_compat", 1, "module"))
    assert _targets(Import("hf_otfusion.trace.expand", "hf_otfusion.trace", "core", 1, "module")) == \
        ["hf_otfusion.trace.core"]
    assert _targets(Import("hf_otfusion.card", "hf_otfusion", "__version__", 1, "function")) == ["hf_otfusion"]
    assert cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}, "d": set()}) == [["a", "b"]]


def test_no_module_imports_another_modules_private_names():
    bad = private_imports()
    assert not bad, f"{len(bad)} private names imported across modules (give them a public name):\n" + "\n".join(bad)


def test_no_import_cycle_at_module_level():
    found = cycles(module_graph())
    assert not found, "import cycles among hf_otfusion modules:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_inside_functions_that_break_a_cycle_are_listed():
    found = deferred_cycle_edges()
    new, stale = sorted(found - set(DEFERRED)), sorted(set(DEFERRED) - found)
    assert not new, "imports inside functions that would close a cycle at module level (add them to DEFERRED in " \
                    "tests/test_imports.py, or remove the cycle):\n" + "\n".join(f"{a} -> {b}" for a, b in new)
    assert not stale, "DEFERRED lists imports that no longer close a cycle (remove them):\n" + \
        "\n".join(f"{a} -> {b}" for a, b in stale)


def test_no_file_over_600_lines():
    long = {str(p.relative_to(ROOT.parent)): n for p in MODULES.values()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"files over {MAX_LINES} lines: {long}"
