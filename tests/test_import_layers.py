"""Imports flow one way down the pipeline: no cycle, no upward import, no other module's `_private` name.

The package is read with `ast` (nothing is imported or executed), so the test is fast and sees every
import: module-level and function-level alike (a function-level import does not hide a dependency, it
only delays it), absolute and relative, `from pkg import submodule` resolved to the submodule.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# The pipeline, earliest stage first. A module may import its own stage and any earlier stage (a lower
# rank); never a later one. Stages of equal rank are siblings and may not import each other either: what
# two siblings share belongs one stage down, where both can import it.
#
#  rank  stage        modules (a package name covers its submodules)
LAYERS = (
    (0, "foundations", ("harness", "harness.errors", "harness.io", "harness.spec", "harness.fingerprint",
                        "harness.devices", "harness.distributed", "harness.runfolder", "harness.sweepfolder")),
    (1, "data", ("harness.data",)),
    (2, "models", ("harness.models",)),
    (3, "training", ("harness.training",)),
    (3, "scoring", ("harness.scoring",)),
    (4, "reporting", ("harness.reporting",)),
    (5, "recipes", ("harness.recipes",)),
    (6, "serving", ("harness.serving",)),
    (6, "benchmarks", ("harness.benchmarks",)),
    (7, "cli", ("harness.cli", "harness.__main__")),
)
# Why these places:
# - `harness.distributed` is process plumbing (rank, world size, "main process only", sharding, joining
#   the process group) that data preparation, training, scoring, the recipes and the CLI all need; it
#   loads no model and reads no data, so it sits below everything that runs on several processes.
# - `harness.runfolder` is the on-disk contract of a run folder (its manifest, file names, the package
#   versions and liveness of the process that wrote it): the recipes write it; reporting, serving, the
#   benchmarks and the CLI read it. Like `spec` (a task's contract) it sits at the bottom, so that every
#   stage reads the same names; it needs only `errors`, `io`, `spec` and `distributed`.
# - `harness.devices` says where a process computes (CUDA or CPU, and the dtype); `distributed` needs it
#   before any model is loaded. `harness.sweepfolder` is a sweep folder's contract, as `runfolder` is a run's:
#   the sweep recipe writes it, the sweep report reads it.
# - `harness` itself (the package's `__init__`) only holds the version.
# - The order above recipes: reporting < recipes < serving | benchmarks < cli. Reporting sits below the
#   recipes because issue 26's own list of violations treats reporting -> recipes as upward and a recipe
#   writing its reports as normal: a report is a building block that renders a finished run or sweep
#   folder (read through `runfolder`), and a recipe is a workflow read top to bottom that ends by calling
#   it (torchtune's recipes import building blocks, never the other way). So a recipe may call
#   `write_reports`, but a report may not call a workflow: the gate's workflow part (score a candidate,
#   compare it with the baseline) is a recipe, only its rendering is reporting.
# - Training and scoring are siblings: loading and unwrapping a model is `models`' job, not either's.


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name
    target: str  # dotted module name the import resolves to
    line: int
    name: str | None = None  # the name taken from `target` (`from target import name`), if not a submodule


@dataclass(frozen=True)
class Stage:
    rank: int
    name: str


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Every module of the package under `root`, by dotted name."""
    modules = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _resolve_relative(importer: str, is_package: bool, level: int, module: str | None) -> str:
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[:-(level - 1)]
    return ".".join(base + ([module] if module else []))


def imports_of(name: str, path: Path, modules: dict[str, Path], package: str) -> tuple[list[Import], list[Import]]:
    """The module's imports of the package's modules, and the `_private` names it takes from other modules
    (`from m import _x`, or `m._x` through a name bound to module `m`)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: list[Import] = []
    bound: dict[str, str] = {}  # local name -> module it is bound to

    def inside(target: str) -> bool:
        return target == package or target.startswith(package + ".")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if not inside(alias.name):
                    continue
                found.append(Import(name, alias.name, node.lineno))
                if alias.asname:
                    bound[alias.asname] = alias.name
                else:
                    bound[alias.name.split(".")[0]] = alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            source = (_resolve_relative(name, is_package, node.level, node.module) if node.level
                      else node.module or "")
            if not inside(source):
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                if submodule in modules:
                    found.append(Import(name, submodule, node.lineno))
                    bound[alias.asname or alias.name] = submodule
                else:
                    found.append(Import(name, source, node.lineno, alias.name))

    private = [imp for imp in found if imp.name and _is_private(imp.name) and imp.target != name]
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            target = _dotted(node.value, bound)
            if target and target in modules and target != name:
                private.append(Import(name, target, node.lineno, node.attr))
    return found, private


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr, bound: dict[str, str]) -> str | None:
    """`a.b.c` as the dotted module name it reaches, when `a` is a name bound to a module."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name) or node.id not in bound:
        return None
    return ".".join([bound[node.id]] + parts[::-1])


def stage_of(module: str, layers=LAYERS) -> Stage | None:
    """The stage of the longest entry of the layer table that is the module or a package above it."""
    best = None
    for rank, stage, prefixes in layers:
        for prefix in prefixes:
            covers = module == prefix or (module.startswith(prefix + ".") and prefix.count(".") > 0)
            if covers and (best is None or len(prefix) > best[0]):
                best = (len(prefix), Stage(rank, stage))
    return best[1] if best else None


def import_graph(root: Path, package: str):
    modules = module_files(root, package)
    edges: list[Import] = []
    private: list[Import] = []
    for name, path in modules.items():
        found, taken = imports_of(name, path, modules, package)
        edges += [imp for imp in found if imp.target != name]
        private += taken
    return modules, edges, private


def cycles(modules, edges: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each in a stable order."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for imp in edges:
        if imp.target in graph:
            graph[imp.importer].add(imp.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(components)


def _statements(imports, root: Path, modules) -> list[str]:
    """One line per import statement: where it is, the module it reaches and the names it takes."""
    names: dict[tuple[str, int, str], list[str]] = {}
    for imp in imports:
        names.setdefault((imp.importer, imp.line, imp.target), [])
        if imp.name:
            names[(imp.importer, imp.line, imp.target)].append(imp.name)
    lines = []
    for (importer, line, target), taken in sorted(names.items()):
        what = f"{target} ({', '.join(sorted(taken))})" if taken else target
        lines.append(f"{modules[importer].relative_to(root)}:{line} imports {what}")
    return lines


def cycle_problems(root: Path, package: str) -> list[str]:
    modules, edges, _ = import_graph(root, package)
    problems = []
    for component in cycles(modules, edges):
        members = set(component)
        inner = _statements([imp for imp in edges if imp.importer in members and imp.target in members],
                            root, modules)
        problems.append("import cycle between " + " <-> ".join(component) + ":\n      " + "\n      ".join(inner))
    return problems


def layer_problems(root: Path, package: str, layers=LAYERS) -> list[str]:
    modules, edges, _ = import_graph(root, package)
    problems = []
    for importer, target in sorted({(imp.importer, imp.target) for imp in edges}):
        own, other = stage_of(importer, layers), stage_of(target, layers)
        if own is None or other is None or own.name == other.name or other.rank < own.rank:
            continue
        direction = "a sibling stage" if other.rank == own.rank else "a later stage"
        why = f"{own.name} (stage {own.rank}) imports {direction}, {other.name} (stage {other.rank})"
        statements = [imp for imp in edges if (imp.importer, imp.target) == (importer, target)]
        problems += [f"{where}: {why}" for where in _statements(statements, root, modules)]
    return problems


def unmapped_modules(root: Path, package: str, layers=LAYERS) -> list[str]:
    return [m for m in module_files(root, package) if stage_of(m, layers) is None]


def private_problems(root: Path, package: str) -> list[str]:
    modules, _, private = import_graph(root, package)
    found = {(imp.importer, imp.line, f"{imp.target}.{imp.name}") for imp in private}
    return [f"{modules[importer].relative_to(root)}:{line} uses {name}, a private name of another module"
            for importer, line, name in sorted(found)]


def _report(title: str, problems: list[str]) -> str:
    return f"{len(problems)} {title}:\n  " + "\n  ".join(problems)


def test_every_module_has_a_stage():
    unmapped = unmapped_modules(REPO, "harness")
    assert not unmapped, _report("module(s) missing from LAYERS in tests/test_import_layers.py; "
                                 "give each a pipeline stage", unmapped)


def test_no_import_cycles():
    problems = cycle_problems(REPO, "harness")
    assert not problems, _report("import cycle(s); move what both sides share into a module both can import",
                                 problems)


def test_imports_flow_down_the_pipeline():
    problems = layer_problems(REPO, "harness")
    assert not problems, _report("import(s) against the pipeline order (see LAYERS)", problems)


def test_no_private_names_of_other_modules():
    problems = private_problems(REPO, "harness")
    assert not problems, _report("use(s) of another module's private name; make it public where it belongs",
                                 problems)


# The checker itself, on a small package with one planted problem of each kind, so that the tests above
# cannot pass because the checker sees nothing.
PLANTED = {
    "pkg/__init__.py": "",
    "pkg/base.py": "from pkg.top import helper\n",  # upward: base -> top
    "pkg/low/__init__.py": "",
    "pkg/low/a.py": "def f():\n    from . import b\n    return b._hidden\n",  # relative, function-level, private
    "pkg/low/b.py": "from .a import f\n_hidden = 1\n",  # cycle a <-> b
    "pkg/mid/__init__.py": "",
    "pkg/mid/left.py": "from pkg.mid.right import _secret\n",  # private name; sibling stage
    "pkg/mid/right.py": "import pkg.low.a as low_a\n_secret = low_a.f\n",  # downward: fine
    "pkg/top.py": "from pkg.low import a\nfrom pkg import base\nhelper = a.f\n",
    "pkg/stray.py": "",
}
PLANTED_LAYERS = (
    (0, "base", ("pkg", "pkg.base")),
    (1, "low", ("pkg.low",)),
    (2, "left", ("pkg.mid.left",)),
    (2, "right", ("pkg.mid.right",)),
    (3, "top", ("pkg.top",)),
)


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    for rel, text in PLANTED.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text, encoding="utf-8")
    return tmp_path


def test_checker_finds_planted_problems(planted: Path):
    modules, edges, _ = import_graph(planted, "pkg")
    pairs = {(imp.importer, imp.target) for imp in edges}
    assert ("pkg.low.a", "pkg.low.b") in pairs  # `from . import b` resolves to the submodule, in a function
    assert ("pkg.low.b", "pkg.low.a") in pairs  # `from .a import f` resolves to the module holding f
    assert ("pkg.top", "pkg.low.a") in pairs  # `from pkg.low import a` is the submodule, not the package

    assert cycles(modules, edges) == [["pkg.base", "pkg.top"], ["pkg.low.a", "pkg.low.b"]]
    assert cycle_problems(planted, "pkg")[1] == ("import cycle between pkg.low.a <-> pkg.low.b:\n"
                                                 "      pkg/low/a.py:2 imports pkg.low.b\n"
                                                 "      pkg/low/b.py:1 imports pkg.low.a (f)")

    layers = layer_problems(planted, "pkg", PLANTED_LAYERS)
    assert len(layers) == 2, layers
    assert layers[0] == "pkg/base.py:1 imports pkg.top (helper): base (stage 0) imports a later stage, top (stage 3)"
    assert layers[1].startswith("pkg/mid/left.py:1 imports pkg.mid.right (_secret): left (stage 2) imports a sibling")

    assert unmapped_modules(planted, "pkg", PLANTED_LAYERS) == ["pkg.mid", "pkg.stray"]
    assert private_problems(planted, "pkg") == [
        "pkg/low/a.py:3 uses pkg.low.b._hidden, a private name of another module",
        "pkg/mid/left.py:1 uses pkg.mid.right._secret, a private name of another module",
    ]
