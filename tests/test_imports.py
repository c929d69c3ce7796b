"""No import cycles among accel, samplers, pruning, distill and apps, read from the source with ``ast``.

Nothing is imported. Every ``import`` / ``from ... import`` statement is an edge, at module level or inside a
function (a lazy import still ties the two modules together); only edges between modules of the five packages
count. The rules:

- ``import a.b.c`` is an edge to ``a.b.c``; ``from a.b import c`` to ``a.b.c`` when that is a module, else to
  ``a.b``; relative imports resolve against the importing module's package. A name that a package loads on first
  use (PEP 562: its ``__init__`` maps names to submodules in a dict literal, as ``accel._EXPORTS``) leads to that
  submodule.
- Importing ``a.b.c`` runs the ``__init__`` of ``a`` and ``a.b`` first: edges to them too, except to the
  importing module's own packages, which Python has imported before the module's body runs. So an ``__init__``
  importing its submodules while they import each other (``from . import sibling``) is no cycle; a submodule
  reading a name defined in its package's ``__init__`` (``from . import NAME``) is an edge to that ``__init__``,
  and a cycle when the ``__init__`` imports the submodule (the name may not exist yet).
- The package graph has an edge A -> B when a module of A imports a module of B, A != B.

A cycle is a strongly connected component of more than one module (or package); a module importing itself is
not one. Packages are also layered: each may import only the layers below its own.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Lowest first; a package may import the packages of lower layers only.
LAYERS = (("samplers",), ("accel",), ("pruning", "distill"), ("apps",))
PACKAGES = tuple(name for layer in LAYERS for name in layer)


def project_modules(root: Path, packages) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the packages (a package is its ``__init__.py``)."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def lazy_exports(tree: ast.Module, package: str, modules) -> dict[str, str]:
    """Names a package ``__init__`` loads on first use: module-level dict literals of name -> submodule."""
    exports = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            pairs = list(zip(node.value.keys, node.value.values))
            if pairs and all(isinstance(k, ast.Constant) and isinstance(v, ast.Constant) for k, v in pairs):
                targets = {k.value: f"{package}.{v.value}" for k, v in pairs}
                if all(t in modules for t in targets.values()):
                    exports.update(targets)
    return exports


def import_edges(root: Path = ROOT, packages=PACKAGES) -> dict[tuple[str, str], set[str]]:
    """(importer, imported) -> the places ("file:line") where the importer imports it."""
    modules = project_modules(root, packages)
    trees = {name: ast.parse(path.read_text(), filename=str(path)) for name, path in modules.items()}
    exports = {name: lazy_exports(tree, name, modules) for name, tree in trees.items()
               if modules[name].name == "__init__.py"}
    edges: dict[tuple[str, str], set[str]] = {}
    for name, tree in trees.items():
        is_package = modules[name].name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        # The importer's own packages (and itself): in sys.modules before its body runs.
        running = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 2)}

        def add(target: str, line: int) -> None:
            parts = target.split(".")
            while parts and ".".join(parts) not in modules:  # `import a.b.attr`: the module is a.b
                parts.pop()
            for i in range(1, len(parts) + 1):
                imported = ".".join(parts[:i])
                if imported != name and (imported not in running or i == len(parts)):
                    place = f"{modules[name].relative_to(root)}:{line}"
                    edges.setdefault((name, imported), set()).add(place)

        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node.lineno)
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                source = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    if f"{source}.{alias.name}" in modules:
                        add(f"{source}.{alias.name}", node.lineno)
                    else:
                        add(exports.get(source, {}).get(alias.name, source), node.lineno)
    return edges


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan), each sorted, in sorted order."""
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph[node]):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while not component or component[-1] != node:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def describe(components, edges) -> str:
    lines = []
    for component in components:
        lines.append("cycle: " + " <-> ".join(component))
        for (a, b), places in sorted(edges.items()):
            if a in component and b in component:
                lines.append(f"    {a} -> {b}  ({', '.join(sorted(places))})")
    return "\n".join(lines)


def package_edges(edges) -> dict[tuple[str, str], set[str]]:
    packages: dict[tuple[str, str], set[str]] = {}
    for (a, b), places in edges.items():
        top_a, top_b = a.split(".")[0], b.split(".")[0]
        if top_a != top_b:
            packages.setdefault((top_a, top_b), set()).update(places)
    return packages


@pytest.fixture(scope="module")
def edges():
    return import_edges()


def test_no_package_cycle(edges):
    packages = package_edges(edges)
    found = cycles(packages)
    assert not found, "package import cycles:\n" + describe(found, packages)


def test_packages_import_only_lower_layers(edges):
    layer_of = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    upward = {k: v for k, v in package_edges(edges).items() if layer_of[k[1]] >= layer_of[k[0]]}
    assert not upward, "imports against the layering " + " < ".join("/".join(layer) for layer in LAYERS) + ":\n" + \
        "\n".join(f"    {a} -> {b}  ({', '.join(sorted(places))})" for (a, b), places in sorted(upward.items()))


@pytest.mark.parametrize("package", ["samplers", "accel", "pruning", "distill", "apps"])
def test_no_module_cycle(edges, package):
    found = [c for c in cycles(edges) if any(m.split(".")[0] == package for m in c)]
    assert not found, f"module import cycles in {package}:\n" + describe(found, edges)


def test_the_rules_on_a_small_tree(tmp_path):
    files = {
        "low/__init__.py": "from .a import f\n_EXPORTS = {'G': 'b'}\nVERSION = 1\n",
        "low/a.py": "from . import b\n\n\ndef f():\n    import os\n    from low import G\n",
        "low/b.py": "G = 2\n",
        "high/__init__.py": "",
        "high/c.py": "def g():\n    from low import G\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = import_edges(tmp_path, ("low", "high"))
    assert set(edges) == {("low", "low.a"), ("low.a", "low.b"), ("high.c", "low"), ("high.c", "low.b")}
    assert edges[("high.c", "low.b")] == {str(Path("high/c.py")) + ":2"}
    assert cycles(edges) == [] and cycles(package_edges(edges)) == []
    # A submodule reading a name its package's __init__ defines after importing that submodule.
    (tmp_path / "low/b.py").write_text("from . import VERSION\n")
    assert cycles(import_edges(tmp_path, ("low", "high"))) == [["low", "low.a", "low.b"]]
