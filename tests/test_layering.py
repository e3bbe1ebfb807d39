"""Imports point downward only: the package layers ``linalg ← ops ← nn ← apps`` and the contracts
between sub-packages, checked on the source of every module.

Every ``import`` / ``from … import`` statement counts, wherever it is (module level, inside a
function or a class, under ``if TYPE_CHECKING``), relative ones included (``from . import x`` and
``from .. import nn`` are resolved to the modules they name), and so do
``importlib.import_module("nngeo_ops....")`` calls with a literal name. The rules:

- a package layer imports only its own layer and the layers below it (``PACKAGE_LAYERS``);
- ``nngeo_ops.errors`` and ``nngeo_ops.memory`` (the memory checks made before a dense object is
  formed) sit below every layer and import nothing of the package but each other;
- ``nngeo_ops.testing`` (the generic operator suite) and ``nngeo_ops.compat`` (the NNGeometry
  compatibility package) may import anything below ``apps``, and no layer imports them;
- ``nngeo_ops/__init__.py``, ``__main__.py`` and ``cli.py`` are the entry points above everything;
- ``apps`` uses only the public surface of the layers below: it imports no private name (leading
  underscore) and no private module of another layer;
- the sub-package contracts of ``SUB_PACKAGE_CONTRACTS`` (extend that list for a new one).
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "nngeo_ops"

# Bottom to top. A module of a layer may import its own layer and the ones before it.
PACKAGE_LAYERS = ["nngeo_ops.linalg", "nngeo_ops.ops", "nngeo_ops.nn", "nngeo_ops.apps"]
BASE_MODULES = ["nngeo_ops.errors", "nngeo_ops.memory"]  # below every layer
SIDE_PACKAGES = ["nngeo_ops.testing", "nngeo_ops.compat"]  # may import anything below apps
ENTRY_POINTS = ["nngeo_ops", "nngeo_ops.__main__", "nngeo_ops.cli"]  # may import anything


@dataclass(frozen=True)
class Contract:
    """Layers of one package, bottom to top: a module of ``levels[i]`` may import modules of
    ``levels[j]`` for j ≤ i only. One level may hold several sibling sub-packages; with
    ``siblings_independent`` they may not import each other. Modules of ``package`` outside every
    level (e.g. ``params.py``) are not constrained by the contract. The contract is skipped while
    ``requires`` (a sub-package) does not exist yet.
    """

    name: str
    package: str
    levels: list[list[str]]
    siblings_independent: bool = False
    requires: str | None = None
    exempt: list[str] = field(default_factory=list)  # importer modules, with a reason in a comment


# ---------------------------------------------------------------------------------------------
# Sub-package contracts. EXTEND HERE for a new one. nn (issue 13), bottom to top: the parameter
# space, batches, output models and layer kinds; the engine; function space; parameter space (its
# implicit form is Jᵀ·H·J of fspace's Jacobian node, so pspace sits above fspace); the entry points.
# tests/nn/test_nn_layering.py checks the same order and, in addition, that nn has no import cycle.
# ---------------------------------------------------------------------------------------------
SUB_PACKAGE_CONTRACTS: list[Contract] = [
    Contract(
        name="nn: params / data / losses / layers → engine → fspace → pspace → api",
        package="nngeo_ops.nn",
        levels=[
            [
                "nngeo_ops.nn.params",
                "nngeo_ops.nn.data",
                "nngeo_ops.nn.losses",
                "nngeo_ops.nn.layers",
            ],
            ["nngeo_ops.nn.engine"],
            ["nngeo_ops.nn.fspace"],
            ["nngeo_ops.nn.pspace"],
            ["nngeo_ops.nn.api"],
        ],
        requires="nngeo_ops.nn.engine",
    ),
]

# apps importing a public name from a lower layer's module that the layer does not re-export. Not
# private (so allowed), but the import breaks when the module moves: listed so that the list is
# seen and shrinks; the test fails when an entry disappears (remove it then) or a new one appears
# (re-export the name from the layer's package, or add it here with a reason).
APPS_DEEP_IMPORTS = {
    # the process-group helpers of data-parallel fitting (nn/engine/distributed.py has its own
    # __all__)
    ("nngeo_ops.apps.laplace", "nngeo_ops.nn.engine.distributed", "all_reduce_sum"),
    ("nngeo_ops.apps.laplace", "nngeo_ops.nn.engine.distributed", "reduce_counts"),
    ("nngeo_ops.apps.laplace", "nngeo_ops.nn.engine.distributed", "resolve_group"),
    # engine pieces the training-time curvature of apps feeds directly (not in nngeo_ops.nn's
    # NNGeometry-style surface)
    ("nngeo_ops.apps.preconditioner", "nngeo_ops.nn.losses", "output_model_for_variant"),
    ("nngeo_ops.apps.curvature_state", "nngeo_ops.nn.engine.accumulators", "EKFACDiagAcc"),
}


# ------------------------------------------------------------------------------ the import graph
@dataclass(frozen=True)
class Import:
    importer: str  # module doing the import
    target: str  # module imported (absolute dotted name)
    name: str | None  # the name taken from it (``from target import name``), if any
    line: int

    def __str__(self) -> str:
        what = f"{self.target}.{self.name}" if self.name else self.target
        return f"{self.importer}:{self.line} imports {what}"


def discover_modules(root: Path = ROOT) -> dict[str, tuple[Path, bool]]:
    """``{dotted module name: (file, is_package)}`` for every module of the package."""
    out = {}
    for path in sorted((root / PKG).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        out[".".join(parts)] = (path, is_pkg)
    return out


def imports_of(module: str, source: str, is_package: bool, known: set[str] | dict) -> list[Import]:
    """Every import of ``source`` (the text of ``module``), resolved to absolute module names.

    ``from X import y`` counts as an import of the module ``X.y`` when that is a module of the
    package (``from . import rules``), else as the name ``y`` of ``X``.
    """
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    out: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [Import(module, a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in known:
                    out.append(Import(module, sub, None, node.lineno))
                else:
                    out.append(Import(module, target, a.name, node.lineno))
        elif (
            isinstance(node, ast.Call)
            and _call_name(node.func) in ("importlib.import_module", "import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append(Import(module, node.args[0].value, None, node.lineno))
    return out


def _call_name(f: ast.expr) -> str:
    if isinstance(f, ast.Name):
        return f.id
    if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
        return f"{f.value.id}.{f.attr}"
    return ""


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _layer_index(module: str) -> int | None:
    for i, prefix in enumerate(PACKAGE_LAYERS):
        if _within(module, prefix):
            return i
    return None


def _graph() -> list[Import]:
    mods = discover_modules()
    out = []
    for name, (path, is_pkg) in mods.items():
        out += [
            i
            for i in imports_of(name, path.read_text(encoding="utf-8"), is_pkg, mods)
            if _within(i.target, PKG)
        ]
    return out


@pytest.fixture(scope="module")
def graph() -> list[Import]:
    return _graph()


# ------------------------------------------------------------------------------ package layers
def layer_violations(graph: list[Import]) -> list[str]:
    bad = []
    for i in graph:
        src = _layer_index(i.importer)
        dst = _layer_index(i.target)
        side_target = any(_within(i.target, p) for p in SIDE_PACKAGES)
        entry_target = i.target in ENTRY_POINTS
        if any(_within(i.importer, b) for b in BASE_MODULES):
            if not any(_within(i.target, b) for b in BASE_MODULES):
                bad.append(f"{i}: errors / memory must not import the rest of the package")
        elif src is not None:
            if dst is not None and dst > src:
                bad.append(f"{i}: {PACKAGE_LAYERS[src]} sits below {PACKAGE_LAYERS[dst]}")
            elif side_target or entry_target:
                bad.append(f"{i}: the layers never import testing/, compat/ or the entry points")
        elif any(_within(i.importer, p) for p in SIDE_PACKAGES):
            if dst is not None and PACKAGE_LAYERS[dst] == "nngeo_ops.apps":
                bad.append(f"{i}: testing/ and compat/ may import anything below apps only")
            elif entry_target:
                bad.append(f"{i}: testing/ and compat/ do not import the entry points")
    return bad


def test_package_layers_import_downward_only(graph):
    assert graph, "no imports found: the scan is broken"
    bad = layer_violations(graph)
    assert not bad, "imports against the layering:\n" + "\n".join(bad)


def _is_private_path(module: str) -> bool:
    return any(p.startswith("_") and not p.startswith("__") for p in module.split(".")[1:])


def apps_private_imports(graph: list[Import]) -> list[str]:
    bad = []
    for i in graph:
        if not _within(i.importer, "nngeo_ops.apps") or _within(i.target, "nngeo_ops.apps"):
            continue
        if _is_private_path(i.target):
            bad.append(f"{i}: a private module of a lower layer")
        elif i.name is not None and i.name.startswith("_"):
            bad.append(f"{i}: a private name of a lower layer")
    return bad


def test_apps_use_only_the_public_surface(graph):
    bad = apps_private_imports(graph)
    assert not bad, (
        "apps/ must use the public surface of the layers below (add a public, tested hook "
        "there):\n" + "\n".join(bad)
    )


def _reexported(package: str, name: str) -> bool:
    mods = discover_modules()
    path, _ = mods[package]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if any((a.asname or a.name) == name for a in node.names):
                return True
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == name:
            return True
    return False


def test_apps_deep_imports_are_the_listed_ones(graph):
    """apps imports a public name from a layer's inner module only where listed above."""
    found = set()
    for i in graph:
        if not _within(i.importer, "nngeo_ops.apps") or i.name is None:
            continue
        layer = _layer_index(i.target)
        if layer is None or PACKAGE_LAYERS[layer] == "nngeo_ops.apps":
            continue
        top = PACKAGE_LAYERS[layer]
        if i.target != top and not _reexported(top, i.name):
            found.add((i.importer, i.target, i.name))
    assert found - APPS_DEEP_IMPORTS == set(), (
        "apps imports names that its lower layer does not re-export; re-export them (the public "
        "surface) or list them in APPS_DEEP_IMPORTS with a reason"
    )
    assert APPS_DEEP_IMPORTS - found == set(), "listed deep imports that are gone: drop them"


# ------------------------------------------------------------------------------ sub-packages
def contract_violations(contract: Contract, graph: list[Import]) -> list[str]:
    def level(module: str) -> tuple[int, str] | None:
        for k, prefixes in enumerate(contract.levels):
            for p in prefixes:
                if _within(module, p):
                    return k, p
        return None

    bad = []
    for i in graph:
        if i.importer in contract.exempt:
            continue
        src, dst = level(i.importer), level(i.target)
        if src is None or dst is None:
            continue
        if dst[0] > src[0]:
            bad.append(f"{i}: {src[1]} sits below {dst[1]}")
        elif contract.siblings_independent and dst[0] == src[0] and dst[1] != src[1]:
            bad.append(f"{i}: siblings {src[1]} and {dst[1]} are independent")
    return bad


@pytest.mark.parametrize("contract", SUB_PACKAGE_CONTRACTS, ids=lambda c: c.name)
def test_sub_package_contracts(contract, graph):
    mods = discover_modules()
    if contract.requires is not None and contract.requires not in mods:
        pytest.skip(f"{contract.requires} does not exist yet")
    for prefixes in contract.levels:
        for p in prefixes:
            assert p in mods, f"{contract.name}: {p} is not a module or package"
    bad = contract_violations(contract, graph)
    assert not bad, f"imports against {contract.name}:\n" + "\n".join(bad)


# ------------------------------------------------------------------------------ the checker itself
def _fake_graph(files: dict[str, str]) -> list[Import]:
    known = {m: None for m in files}
    out = []
    for m, src in files.items():
        is_pkg = m in {"nngeo_ops.ops", "nngeo_ops.nn", "nngeo_ops.apps", "nngeo_ops.linalg"}
        out += [i for i in imports_of(m, src, is_pkg, known) if _within(i.target, PKG)]
    return out


def test_the_checker_sees_every_kind_of_import():
    files = {
        "nngeo_ops.ops": "",
        "nngeo_ops.nn": "",
        "nngeo_ops.apps": "",
        "nngeo_ops.linalg": "",
        "nngeo_ops.linalg.cg": "def f():\n    from ..ops import Dense\n",
        "nngeo_ops.ops.base": "from .. import nn\n",
        "nngeo_ops.ops.compile": "import importlib\nimportlib.import_module('nngeo_ops.apps.x')\n",
        "nngeo_ops.nn.jac": "class A:\n    def f(self):\n        import nngeo_ops.apps.spectrum\n",
        "nngeo_ops.ops.fine": "from . import base\nfrom ..linalg import cg\nfrom ..errors import X\n",
        "nngeo_ops.apps.spectrum": "from ..ops.base import _walk\nfrom ..linalg._matvec import y\n"
        "from ..ops import Dense\nfrom . import _demo\n",
        "nngeo_ops.apps.x": "",
        "nngeo_ops.testing.suite": "from ..apps import spectrum\n",
        "nngeo_ops.errors": "from .ops import Dense\n",
    }
    g = _fake_graph(files)
    bad = layer_violations(g)
    culprits = sorted({b.split(":")[0] for b in bad})
    assert culprits == [
        "nngeo_ops.errors",
        "nngeo_ops.linalg.cg",
        "nngeo_ops.nn.jac",
        "nngeo_ops.ops.base",
        "nngeo_ops.ops.compile",
        "nngeo_ops.testing.suite",
    ], bad
    private = apps_private_imports(g)
    assert len(private) == 2 and all("nngeo_ops.apps.spectrum" in p for p in private), private


def test_the_sub_package_checker():
    c = Contract(
        name="t",
        package="nngeo_ops.nn",
        levels=[
            ["nngeo_ops.nn.layers"],
            ["nngeo_ops.nn.engine"],
            ["nngeo_ops.nn.pspace", "nngeo_ops.nn.fspace"],
        ],
        siblings_independent=True,
    )
    g = [
        Import("nngeo_ops.nn.engine.hooks", "nngeo_ops.nn.layers.linear", None, 1),  # fine
        Import("nngeo_ops.nn.layers.linear", "nngeo_ops.nn.engine", "x", 2),  # upward
        Import("nngeo_ops.nn.pspace.kfac", "nngeo_ops.nn.fspace.jac", None, 3),  # siblings
        Import("nngeo_ops.nn.params", "nngeo_ops.nn.pspace", None, 4),  # outside the levels
    ]
    bad = contract_violations(c, g)
    assert [b.split(":")[1].split()[0] for b in bad] == ["2", "3"], bad
