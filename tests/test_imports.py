"""The package's import graph has no cycles; no file is over 500 lines; ``__init__.py`` only re-exports.

Pure AST checks, no imports of ``gad_ray`` and no Ray. Every import statement counts: top level,
inside functions, under ``TYPE_CHECKING``; relative imports are resolved. ``from pkg import name``
imports ``pkg`` (its ``__init__.py``) and, when ``name`` is a submodule, ``pkg.name`` too.

The allowed layering of the packages (who may import whom) is ``LAYERS`` below and
docs/architecture.md#layers; a package may import only packages of strictly lower layers.
"""

from __future__ import annotations

import ast
from collections.abc import Collection, Mapping
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gad_ray"
MAX_LINES = 500

# The packages (and top-level modules) of gad_ray, bottom to top: a package may import only
# packages of LOWER layers (docs/architecture.md#layers). Same layer: no imports either way.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("algorithms", "config", "futures", "memory"),  # torch-only losses; the schema; utilities
    ("role_specs",),  # the role registry: every role's kind, size, share, factory, checks
    ("data", "models", "placement", "run_dir"),  # batches, models/LoRA files, pools, run dir
    ("rollout",),  # vLLM / HF workers, weight sync (receivers)
    ("learner",),  # learner infrastructure, engines, LoRA stacks, G and the Proxy-KD proxy
    ("discriminator",),  # D and the one group of G and D over a shared LoRA base
    ("recipes",),  # the algorithms as stages (a recipe may name the learner groups it needs)
    ("validate",),  # the whole config check (the recipes' own checks, model shapes)
    ("export", "hydra_app", "plan"),  # checkpoints -> HF; composition + CLI entry; memory plan
    ("teacher",),  # fetcher actor, cache (its CLI uses hydra_app)
    ("eval",),  # gad-eval (exports checkpoints, asks the teacher API)
    ("synthetic",),  # synthetic tasks, the pre-trained synthetic student, the teacher server
    ("driver",),  # the Driver, its sampler, roles, gad-train
    ("demo",),
)

# The only imports allowed against LAYERS, each from a function of the lower package, resolving
# a ``synthetic:`` spec. They close no cycle between modules (test_no_module_cycles); moving
# synthetic/tasks.py under data/ and synthetic/student.py under models/ would remove them.
ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("data", "synthetic"): "data.path=synthetic:<n> builds the synthetic tasks (data/dataset.py)",
    ("models", "synthetic"): "model path synthetic:student builds it (models/loading.py)",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def modules() -> dict[str, Path]:
    """Every module of ``gad_ray``, by dotted name (a package by its ``__init__.py``)."""
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, is_package: bool, target: str | None, level: int) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if not level:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _known(name: str, known: Collection[str]) -> str | None:
    """The module ``name`` refers to: itself, or the nearest enclosing module in ``known``."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def imports_in(source: str, module: str, is_package: bool, known: Collection[str]) -> set[str]:
    """The modules of ``known`` that ``source`` (the text of ``module``) imports anywhere."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, is_package, node.module, node.level)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "gad_ray" or target.startswith("gad_ray."):
                hit = _known(target, known)
                if hit and hit != module:
                    found.add(hit)
    return found


@cache
def module_graph() -> dict[str, frozenset[str]]:
    """Each module of ``gad_ray`` -> the ``gad_ray`` modules it imports."""
    mods = modules()
    return {
        m: frozenset(imports_in(p.read_text(), m, p.name == "__init__.py", mods))
        for m, p in mods.items()
    }


def package_of(module: str) -> str:
    """``gad_ray.driver.sampler`` -> ``driver``; ``gad_ray.placement`` -> ``placement``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def package_graph(graph: Mapping[str, Collection[str]]) -> dict[str, set[str]]:
    """The graph of the top-level packages: an edge where one's modules import the other's."""
    out: dict[str, set[str]] = {}
    for module, targets in graph.items():
        edges = out.setdefault(package_of(module), set())
        edges |= {package_of(t) for t in targets} - {package_of(module), ""}
    out.pop("", None)  # gad_ray/__init__.py: a docstring
    return out


def cycles(graph: Mapping[str, Collection[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _describe(graph: Mapping[str, Collection[str]], component: list[str]) -> str:
    members = set(component)
    edges = [f"  {a} -> {b}" for a in component for b in sorted(set(graph[a]) & members)]
    return f"{len(component)} members: {', '.join(component)}\n" + "\n".join(edges)


def test_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_finds_every_import_statement() -> None:
    known = {"gad_ray.a", "gad_ray.a.b", "gad_ray.a.c", "gad_ray.d", "gad_ray.e", "gad_ray.f"}
    source = """
from typing import TYPE_CHECKING
from . import c
from gad_ray.d import Name
if TYPE_CHECKING:
    from gad_ray.e import Other
def late():
    import gad_ray.f.missing
    from gad_ray import a
"""
    assert imports_in(source, "gad_ray.a.b", False, known) == {
        "gad_ray.a",  # ``from . import c`` runs the package's __init__ ...
        "gad_ray.a.c",  # ... and imports the submodule c
        "gad_ray.d",
        "gad_ray.e",  # under TYPE_CHECKING
        "gad_ray.f",  # in a function; gad_ray.f.missing is no module: its nearest, gad_ray.f
    }
    assert _resolve("gad_ray.a.b", False, "x.y", 2) == "gad_ray.x.y"
    assert _resolve("gad_ray.a", True, "c", 1) == "gad_ray.a.c"


def test_no_module_cycles() -> None:
    graph = module_graph()
    found = cycles(graph)
    assert not found, "import cycles between modules:\n" + "\n".join(
        _describe(graph, c) for c in found
    )


def test_no_package_cycles() -> None:
    graph = package_graph(module_graph())
    for a, b in ALLOWED_UPWARD:
        assert b in graph[a], f"ALLOWED_UPWARD lists {a} -> {b}, which is gone: drop it"
        graph[a] = graph[a] - {b}
    found = cycles(graph)
    assert not found, "import cycles between packages:\n" + "\n".join(
        _describe(graph, c) for c in found
    )


def test_packages_follow_the_layers() -> None:
    layer = {name: i for i, names in enumerate(LAYERS) for name in names}
    graph = package_graph(module_graph())
    unknown = sorted(set(graph) - set(layer))
    assert not unknown, f"packages missing from LAYERS in tests/test_imports.py: {unknown}"
    wrong = [
        f"  {a} (layer {layer[a]}) imports {b} (layer {layer[b]}): "
        + ", ".join(
            sorted(
                m
                for m in module_graph()
                if package_of(m) == a and any(package_of(t) == b for t in module_graph()[m])
            )
        )
        for a in sorted(graph)
        for b in sorted(graph[a])
        if layer[b] >= layer[a] and (a, b) not in ALLOWED_UPWARD
    ]
    assert not wrong, "imports against the layering (LAYERS):\n" + "\n".join(wrong)


def test_no_file_over_500_lines() -> None:
    long = {
        str(p.relative_to(ROOT)): n
        for p in modules().values()
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files of gad_ray/ over {MAX_LINES} lines (split them): {long}"


def _is_reexport(node: ast.stmt, first: bool) -> bool:
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        return True
    if first and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
        return isinstance(node.value.value, str)  # the docstring
    if isinstance(node, ast.Assign):
        return [getattr(t, "id", None) for t in node.targets] == ["__all__"]
    return False


def test_init_files_only_reexport() -> None:
    bad = {}
    for path in modules().values():
        if path.name != "__init__.py":
            continue
        body = ast.parse(path.read_text()).body
        lines = [n.lineno for i, n in enumerate(body) if not _is_reexport(n, i == 0)]
        if lines:
            bad[str(path.relative_to(ROOT))] = lines
    assert not bad, (
        f"__init__.py files with code beyond imports, __all__ and a docstring (file: lines): {bad}"
    )
