"""The package layers of stiv_core: the import graph has no cycles, and the layer rules hold.

The graph is read from the source with `ast`: every `import` and `from ... import` statement counts,
the ones inside functions included (a lazy import is still a dependency). Importing `a.b.c` runs the
`__init__` of `a` and `a.b` first, so a module also depends on every package above what it imports,
except its own packages (their `__init__` is already running when the module is imported: a package
that re-exports its submodules is not a cycle).

One exception: the body of a module-level `if __name__ == "__main__":` runs only when the file is the
program (`python -m stiv_core.config`), as the module `__main__`, never on import; its imports are the
program's, not the module's (two commands kept from before their work moved up a layer forward there).
"""
from __future__ import annotations

import ast
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "stiv_core"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules(root: Path, package: str) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / package).rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """Absolute dotted names `path` imports (module or module.attribute), relative ones resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    tree.body = [node for node in tree.body if not is_main_guard(node)]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def ancestors(name: str) -> set[str]:
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def is_main_guard(node: ast.stmt) -> bool:
    """`if __name__ == "__main__":` at module level."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__" and len(test.comparators) == 1
            and isinstance(test.comparators[0], ast.Constant) and test.comparators[0].value == "__main__")


def resolve(target: str, modules: dict[str, Path]) -> set[str]:
    """The stiv_core modules importing `target` runs: the module and every package above it."""
    return ({target} | ancestors(target)) & set(modules)


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> dict[str, set[str]]:
    """Module -> the modules of `package` that importing it runs (see the module doc)."""
    modules = all_modules(root, package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for target in imported_names(path, name):
            edges |= resolve(target, modules)
        graph[name] = edges - ancestors(name) - {name}
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm; the components with more than one module, each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def package_edges(graph: dict[str, set[str]], source: str, target: str) -> list[str]:
    def inside(name: str, package: str) -> bool:
        return name == package or name.startswith(package + ".")

    return sorted(f"{a} -> {b}" for a, targets in graph.items() if inside(a, source)
                  for b in targets if inside(b, target))


def write_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def test_the_walker_finds_lazy_relative_absolute_and_package_init_cycles(tmp_path):
    write_package(tmp_path, {
        "pkg/__init__.py": "from .a import f\n",              # a package re-exporting its module: no cycle
        "pkg/a.py": "from .b import g\ndef f(): ...\n",
        "pkg/b.py": "def g():\n    from . import a\n",       # lazy, inside a function: a <-> b
        "pkg/sub/__init__.py": "from ..c import h\n",
        "pkg/sub/d.py": "x = 1\n",
        "pkg/c.py": "import pkg.sub.d\ndef h(): ...\n",     # runs pkg/sub/__init__, which imports c
        "pkg/e.py": "if __name__ == '__main__':\n    from .f import main\n",   # the program's, not e's
        "pkg/f.py": "from .e import x\n",
    })
    graph = import_graph(tmp_path, "pkg")
    assert graph["pkg"] == {"pkg.a"} and graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.c"] == {"pkg.sub", "pkg.sub.d"} and graph["pkg.sub"] == {"pkg.c"}
    assert graph["pkg.e"] == set() and graph["pkg.f"] == {"pkg.e"}
    assert strongly_connected(graph) == [["pkg.a", "pkg.b"], ["pkg.c", "pkg.sub"]]
    assert package_edges(graph, "pkg.sub", "pkg.c") == ["pkg.sub -> pkg.c"]


def test_stiv_core_has_no_import_cycles():
    cycles = strongly_connected(import_graph())
    assert cycles == [], "import cycles in stiv_core:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_subpackages_have_no_import_cycles():
    """Folded to one node per subpackage (stiv_core.data, stiv_core.model, ...), still no cycle."""
    def layer(name: str) -> str:
        return ".".join(name.split(".")[:2])

    layers: dict[str, set[str]] = {}
    for a, targets in import_graph().items():
        layers.setdefault(layer(a), set()).update(layer(b) for b in targets if layer(b) != layer(a))
    layers = {name: targets & set(layers) for name, targets in layers.items()}
    cycles = strongly_connected(layers)
    assert cycles == [], "cycles between layers:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_data_does_not_import_training():
    assert package_edges(import_graph(), f"{PACKAGE}.data", f"{PACKAGE}.training") == []


def test_config_is_a_leaf():
    edges = import_graph()[f"{PACKAGE}.config"]
    assert edges == set(), f"stiv_core/config.py imports {sorted(edges)}"


def test_no_test_module_imports_another():
    """Shared test helpers live in helper modules (tests/fakes.py, tests/pack.py, ...), so a test module can
    be run, moved or deleted alone."""
    offenders = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        name = module_name(path, ROOT)
        hits = sorted({n.split(".")[1] for n in imported_names(path, name) if n.startswith("tests.test_")})
        if hits:
            offenders[path.name] = hits
    assert not offenders, f"test modules importing test modules: {offenders}"
