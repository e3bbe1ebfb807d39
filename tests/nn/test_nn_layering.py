"""Imports inside ``nngeo_ops.nn`` point downward only (issue 13).

The sub-packages form layers, bottom to top::

    params, data, losses, layers/   the parameter space, batches, output models, layer kinds
    engine/                          hooks, accumulators, generators, the NTK engine, distributed
    fspace/                          Jacobian node, PFMaps, FMats, NTK matrices
    pspace/                          representations (their implicit form is Jᵀ·H·J of fspace's J)
    api                              FIM, GGN, Hessian ...

A module may import modules of its own layer or of lower ones, never of a higher one, and the
import graph of the modules of ``nn`` has no cycle. Every import counts: at module level, inside a
function (a lazy import is still a dependency) or under ``if TYPE_CHECKING`` (annotations only, so
those are the one exception: they are skipped). ``nn/__init__.py`` only re-exports and may import
everything.
"""

import ast
from pathlib import Path

NN = Path(__file__).resolve().parents[2] / "nngeo_ops" / "nn"

LEVELS = {
    "params": 0,
    "data": 0,
    "losses": 0,
    "layers": 0,
    "engine": 1,
    "fspace": 2,
    "pspace": 3,
    "api": 4,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(NN).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """The modules of ``nn`` that ``path`` imports (names relative to ``nngeo_ops.nn``)."""
    tree = ast.parse(path.read_text())
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    if name == "":
        package = []
    known = {_module_name(p) for p in NN.rglob("*.py")}
    found = set()

    def visit(node):
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                up = node.level - 1
                if up > len(package):
                    return  # above nn (nngeo_ops.errors, nngeo_ops.ops)
                base = package[: len(package) - up]
            else:
                if not (node.module or "").startswith("nngeo_ops.nn"):
                    return
                base, node_module = ["nngeo_ops", "nn"], node.module[len("nngeo_ops.nn.") :]
                base = []
                found.update(_targets(base, node_module, node.names, known))
                return
            found.update(_targets(base, node.module, node.names, known))
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("nngeo_ops.nn."):
                    found.add(alias.name[len("nngeo_ops.nn.") :])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(name)
    return found


def _targets(base, module, names, known):
    target = ".".join([*base, *([module] if module else [])])
    out = set()
    for alias in names:  # `from . import functional` imports a module
        sub = f"{target}.{alias.name}" if target else alias.name
        if sub in known:
            out.add(sub)
    if not out and target in known and target != "":
        out.add(target)
    return out


def _graph() -> dict[str, set[str]]:
    return {
        _module_name(p): _imports(p)
        for p in NN.rglob("*.py")
        if _module_name(p) != "" and "__pycache__" not in p.parts
    }


def _level(module: str) -> int:
    return LEVELS[module.split(".")[0]]


def test_every_module_has_a_layer():
    assert all(m.split(".")[0] in LEVELS for m in _graph()), sorted(_graph())


def test_imports_point_downward():
    upward = [
        f"{m} imports {t}"
        for m, targets in _graph().items()
        for t in sorted(targets)
        if t and _level(t) > _level(m)
    ]
    assert upward == [], "\n".join(upward)


def test_no_import_cycle():
    graph = _graph()
    state, stack, cycles = {}, [], []

    def dfs(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(graph.get(m, ())):
            if t not in graph:
                continue
            if state.get(t) == "open":
                cycles.append(" -> ".join([*stack[stack.index(t) :], t]))
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert cycles == [], "\n".join(cycles)


def test_the_checker_sees_lazy_and_relative_imports():
    """The checker itself: a function-level relative import of a sibling module is found."""
    graph = _graph()
    # params imports the layer-kind registry lazily, inside LayerCollection.from_model
    assert "layers.registry" in graph["params"]
    # engine/curvature_generator imports `from . import functional as fx`
    assert "engine.functional" in graph["engine.curvature_generator"]
