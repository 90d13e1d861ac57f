"""The engine's import graph: no circles, no GUI toolkit, and each layer imports only what lies below it.

The graph is read from the source (``ast``), so it also sees imports inside functions (the lazy ones that hid
the old ``demo.py`` -> ``cli.py`` -> ``demo.py`` circle) and needs nothing imported.
"""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "AttentionSegLib"
PACKAGE = "AttentionSegLib"

#: the Slicer application and its GUI toolkits: the engine runs headless and never imports them
GUI_MODULES = {"slicer", "qt", "vtk", "ctk", "slicer.util", "AttentionSegMRML", "AttentionSegBackend",
               "AttentionSegController"}

#: module prefix -> the engine modules it must not import (the lower layer never imports the higher one)
FORBIDDEN = {
    f"{PACKAGE}.training": (f"{PACKAGE}.inference",),
}

#: the bottom layers: they import nothing of the engine outside themselves and the leaves
BOTTOM = (f"{PACKAGE}.networks", f"{PACKAGE}.losses")

#: leaves: conventions every layer may import (the bottom ones too); they import nothing of the engine
LEAVES = (f"{PACKAGE}.label_maps",)


def _engine_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(ENGINE.rglob("*.py")):
        parts = list(path.relative_to(ENGINE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _imports(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every module ``module`` imports anywhere in its file (top level or inside functions)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                found.add(submodule if submodule in modules else target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _engine_modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles among engine modules (Tarjan's strongly connected components of size > 1)."""
    edges = {m: sorted(t for t in targets if t in graph and t != m) for m, targets in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return circles


def test_the_graph_sees_the_engine_and_its_lazy_imports():
    graph = _graph()
    assert f"{PACKAGE}.inference" in graph and f"{PACKAGE}.training.loop" in graph
    # cli imports the engine inside its command functions only: the walker must still see those edges
    assert f"{PACKAGE}.inference" in graph[f"{PACKAGE}.cli"]


def test_the_engine_has_no_import_circles():
    assert _cycles(_graph()) == []


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_engine_never_imports_slicer_qt_or_vtk():
    offenders = {m: sorted(t for t in targets if t in GUI_MODULES or t.split(".")[0] in GUI_MODULES)
                 for m, targets in _graph().items()}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_training_does_not_import_inference():
    graph = _graph()
    offenders = {m: sorted(t for t in targets for banned in FORBIDDEN[prefix] if _within(t, banned))
                 for prefix in FORBIDDEN for m, targets in graph.items() if _within(m, prefix)}
    assert {m: t for m, t in offenders.items() if t} == {}


def test_networks_and_losses_import_nothing_above_them():
    graph = _graph()
    offenders = {}
    for module, targets in graph.items():
        if any(_within(module, bottom) for bottom in BOTTOM):
            above = sorted(t for t in targets if _within(t, PACKAGE)
                           and not any(_within(t, lower) for lower in (*BOTTOM, *LEAVES)))
            if above:
                offenders[module] = above
    assert offenders == {}


def test_the_leaves_import_nothing_of_the_engine():
    graph = _graph()
    assert {leaf: sorted(t for t in graph[leaf] if _within(t, PACKAGE)) for leaf in LEAVES} == \
        {leaf: [] for leaf in LEAVES}


def test_the_walker_catches_a_bottom_layer_importing_upwards(tmp_path):
    (tmp_path / "losses.py").write_text("from .inference import predict_volume\n", encoding="utf-8")
    modules = {f"{PACKAGE}.losses": tmp_path / "losses.py", f"{PACKAGE}.inference": tmp_path / "x.py"}
    assert _imports(f"{PACKAGE}.losses", tmp_path / "losses.py", modules) == {f"{PACKAGE}.inference"}
