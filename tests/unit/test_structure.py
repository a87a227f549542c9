"""The tree's structure rules, read from the code with `ast` (nothing imported).

* no import cycle among src/ modules, function-level imports included;
* nothing outside nicsplit.cli imports nicsplit.cli;
* no module imports a _private name from another module;
* layers import only downwards (core at the bottom, cli at the top);
* an import inside a function carries a comment saying why;
* no source file over 800 lines (wire/nbd.py may stay one cohesive codec).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "nicsplit"
MAX_LINES = 800
LONG_OK = {"nicsplit.wire.nbd"}

# Which top-level packages each package may import (besides itself).
LAYERS = {
    "core": set(),
    "wire": {"core"},
    "storage": {"core"},
    "journal": {"core", "wire", "storage"},
    "card": {"core", "wire"},
    "host": {"core", "wire", "card"},
    "recovery": {"core", "wire", "storage", "journal", "host"},
    "appliance": {"core", "wire", "storage", "journal", "recovery"},
    "control": {"core", "wire", "storage", "journal", "card", "host", "recovery", "appliance"},
    "testing": {"core", "wire", "storage", "journal", "card", "host", "recovery", "appliance", "control"},
    "cli": {"core", "wire", "storage", "journal", "card", "host", "recovery", "appliance", "control"},
}


def module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def resolve(mod: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = mod.split(".") if is_package(mod) else mod.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


class Imports(ast.NodeVisitor):
    """Every import of a module: (target module, imported names, line, nested?)."""

    def __init__(self, mod: str) -> None:
        self.mod = mod
        self.depth = 0
        self.found: list[tuple[str, list[str], int, bool]] = []

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def visit_Import(self, node: ast.Import) -> None:
        for a in node.names:
            self.found.append((a.name, [], node.lineno, self.depth > 0))

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        target = resolve(self.mod, node)
        self.found.append((target, [a.name for a in node.names], node.lineno, self.depth > 0))


def imports_of(mod: str):
    v = Imports(mod)
    v.visit(ast.parse(MODULES[mod].read_text()))
    return v.found


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = {m: set() for m in MODULES}
    for mod in MODULES:
        for target, names, _line, _nested in imports_of(mod):
            if not target.startswith("nicsplit"):
                continue
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            if subs:
                g[mod].update(subs)
            if target in MODULES and len(subs) < len(names) or not names:
                g[mod].add(target)
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of size > 1 (or self loops)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in g.get(v, ()):
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            strong(v)
    return out


def layer(mod: str) -> str | None:
    parts = mod.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_import_cycles() -> None:
    g = graph()
    # A package's __init__ importing its own submodules is how a package
    # shows its face; a submodule importing its package back would cycle.
    found = cycles(g)
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(c) for c in found)


def test_nothing_outside_cli_imports_cli() -> None:
    bad = []
    for mod, targets in graph().items():
        if layer(mod) == "cli" or mod == "nicsplit.__main__":
            continue
        bad += [f"{mod} imports {t}" for t in targets if t == "nicsplit.cli" or t.startswith("nicsplit.cli.")]
    assert not bad, "\n".join(bad)


def test_layers_import_downwards() -> None:
    bad = []
    for mod, targets in graph().items():
        me = layer(mod)
        if me is None:
            continue
        for t in targets:
            other = layer(t)
            if other and other != me and other not in LAYERS[me]:
                bad.append(f"{mod} ({me}) imports {t} ({other})")
    assert not bad, "\n".join(sorted(bad))


def test_no_private_names_imported_across_modules() -> None:
    bad = []
    for mod in MODULES:
        for target, names, line, _nested in imports_of(mod):
            if target.startswith("nicsplit") and target != mod:
                bad += [f"{mod}:{line} imports {n} from {target}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_function_level_imports_say_why() -> None:
    bad = []
    for mod, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, _names, line, nested in imports_of(mod):
            if not nested:
                continue
            here, above = lines[line - 1], lines[line - 2].strip() if line > 1 else ""
            if "#" not in here and not above.startswith("#"):
                bad.append(f"{mod}:{line} imports {target} inside a function without a comment saying why")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_source_files_stay_short(mod: str) -> None:
    n = len(MODULES[mod].read_text().splitlines())
    if mod in LONG_OK:
        return
    assert n <= MAX_LINES, f"{MODULES[mod]} has {n} lines (at most {MAX_LINES}): split it by concern"


def test_the_rules_can_fail() -> None:
    """The checker itself finds a cycle and a private import when there is one."""
    assert cycles({"a": {"b"}, "b": {"a"}, "c": set()}) == [["a", "b"]]
    assert cycles({"a": {"a"}}) == [["a"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_test_module_basenames_are_unique() -> None:
    """Tests are imported by basename (no packages under tests/): two files of
    one name in different folders stop `make test` at collection."""
    tests = Path(__file__).resolve().parents[1]
    seen: dict[str, list[str]] = {}
    for p in tests.rglob("test_*.py"):
        seen.setdefault(p.name, []).append(str(p.relative_to(tests)))
    dup = {k: v for k, v in seen.items() if len(v) > 1}
    assert not dup, f"test modules sharing a basename: {dup}"
