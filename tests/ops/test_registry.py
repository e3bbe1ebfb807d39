"""The rule registry: explicit priorities, an order independent of imports, the rule memo, Woodbury's
pieces and the ``"power"`` rules of each node kind.

Ground truths are dense matrices built with plain torch.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import FrozenInstanceError
from pathlib import Path

import pytest
import torch

import nngeo_ops.nn  # noqa: F401  (its rules belong to the registry whose order is checked)
from nngeo_ops.ops import (
    BlockDiag,
    Compiled,
    CompilePolicy,
    Dense,
    Diagonal,
    Eigen,
    Identity,
    Inverse,
    Kronecker,
    LinearOperator,
    LowRank,
    MatFree,
    Power,
    Product,
    Scale,
    ScaledIdentity,
    Sum,
    all_rules,
    rule,
)
from nngeo_ops.ops import registry as reg
from nngeo_ops.ops.rules import woodbury
from nngeo_ops.ops.rules.woodbury import (
    WideCongruenceParts,
    WoodburyParts,
    wide_congruence_parts,
    woodbury_parts,
)

F64 = torch.float64
REPO = Path(__file__).resolve().parents[2]


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=F64)
    return B @ B.mT / n + 0.1 * torch.eye(n, dtype=F64)


def node_classes():
    out, todo = set(), [LinearOperator]
    while todo:
        c = todo.pop()
        if c not in out:
            out.add(c)
            todo += c.__subclasses__()
    return sorted(out, key=lambda c: (c.__module__, c.__qualname__))


OPS = ("rewrite", "power", "solve", "slogdet", "diag", "trace", "frobenius", "eigh")


def dispatch_table(registry):
    return {
        (op, c): [r.name for r in registry.rules_for(op, c)] for op in OPS for c in node_classes()
    }


@pytest.fixture
def private_registry(monkeypatch):
    """A copy of the library's registry that the test may change freely."""
    mine = reg._REGISTRY.copy()
    monkeypatch.setattr(reg, "_REGISTRY", mine)
    return mine


# ------------------------------------------------------------------------------ ordering
def test_priority_then_name_then_mro():
    class Base(LinearOperator):
        pass

    class Child(Base):
        pass

    r = reg.RuleRegistry()
    fn = lambda node, ctx: None  # noqa: E731
    for name, cls, prio in [
        ("b", Base, 0),
        ("z low", Child, -5),
        ("a", Base, 0),
        ("y", Child, 10),
        ("x", Child, 10),
        ("high", Base, 100),
    ]:
        r.add(reg.Rule("solve", cls, fn, name, priority=prio))
    # the subclass's own rules first (priority descending, ties by name), then the base's
    assert [x.name for x in r.rules_for("solve", Child)] == ["x", "y", "z low", "high", "a", "b"]
    assert [x.name for x in r.rules_for("solve", Base)] == ["high", "a", "b"]
    assert r.rules_for("trace", Child) == ()


def test_same_name_replaces_and_bad_priority_is_refused():
    r = reg.RuleRegistry()
    r.add(reg.Rule("diag", Dense, lambda n, c: 1, "mine", priority=5))
    r.add(reg.Rule("diag", Dense, lambda n, c: 2, "mine", priority=-1))
    (only,) = r.rules_for("diag", Dense)
    assert only.priority == -1 and only.fn(None, None) == 2
    assert r.remove("diag", Dense, "mine") is only and r.rules_for("diag", Dense) == ()
    with pytest.raises(TypeError, match="priority must be an int"):
        r.add(reg.Rule("diag", Dense, lambda n, c: 1, "x", priority=1.5))


@pytest.mark.parametrize("seed", range(5))
def test_shuffled_registration_gives_the_same_dispatch(seed):
    rules = all_rules()
    random.Random(seed).shuffle(rules)
    shuffled = reg.RuleRegistry()
    for r in rules:
        shuffled.add(r)
    assert dispatch_table(shuffled) == dispatch_table(reg._REGISTRY)


def test_all_rules_lists_every_rule_in_dispatch_order():
    rules = all_rules()
    assert len({(r.op, r.cls, r.name) for r in rules}) == len(rules)
    by_key = {}
    for r in rules:
        by_key.setdefault((r.op, r.cls), []).append(r)
    for (op, cls), rs in by_key.items():
        assert [r.sort_key() for r in rs] == sorted(r.sort_key() for r in rs)
        assert [r.name for r in reg._REGISTRY.rules_for(op, cls)][: len(rs)] == [r.name for r in rs]


def test_library_priorities_where_rules_compete():
    # the documented order of the rules that share an (operation, class)
    names = lambda op, cls: [r.name for r in reg._REGISTRY.on_class(op, cls)]  # noqa: E731
    assert names("rewrite", Sum) == ["canonical sum", "block-wise sum", "absorb shift"]
    solve = names("solve", Sum)
    assert solve[0].startswith("Woodbury (") and solve[1].startswith("Woodbury in function")
    assert solve[2].startswith("Bartels–Stewart")
    assert [r.fallback for r in reg._REGISTRY.on_class("solve", LinearOperator)] == [True, True]
    assert names("diag", LinearOperator)[0] == "dense diagonal (fallback)"


def test_a_new_rule_slots_in_by_priority(private_registry):
    calls = []

    def marked_solve(node, ctx):
        calls.append(node)
        return (lambda X: X * 0.0) if getattr(node, "_marked", False) else None

    A = Diagonal(torch.rand(6, dtype=F64) + 1.0) + LowRank(torch.randn(6, 2, dtype=F64))
    # below Woodbury (30): Woodbury still wins
    rule("solve", Sum, name="marked", priority=25)(marked_solve)
    c = A.compile()
    c.solve(torch.ones(6, dtype=F64))
    assert c.routine("solve") == "Woodbury (structured + low rank)" and not calls
    # above it: it is asked first, and a non-matching rule hands over to the next
    private_registry.remove("solve", Sum, "marked")
    rule("solve", Sum, name="marked", priority=35)(marked_solve)
    c = A.compile()
    c.solve(torch.ones(6, dtype=F64))
    assert c.routine("solve") == "Woodbury (structured + low rank)" and len(calls) == 1
    c = A.compile()
    c.simplified._marked = True
    assert torch.equal(c.solve(torch.ones(6, dtype=F64)), torch.zeros(6, dtype=F64))
    assert c.routine("solve") == "marked"


_SHUFFLE_SCRIPT = r"""
import importlib, json, random, sys
import torch
import nngeo_ops, nngeo_ops.nn
from nngeo_ops.ops import registry as reg
from nngeo_ops.ops import rules as rules_pkg
sys.path.insert(0, sys.argv[2])
from tests.ops.test_registry import battery, dispatch_table

def snapshot():
    table = {f"{op} {c.__module__}.{c.__qualname__}": v for (op, c), v in dispatch_table(reg._REGISTRY).items()}
    return {"table": table, "battery": battery()}

out = [snapshot()]
mods = sorted(n for n in vars(rules_pkg) if n in {"diag", "eigh", "fallback", "inverse", "logdet",
    "power", "products", "scale", "solve", "structure", "sums", "sylvester", "thin_shift", "transpose",
    "woodbury"})
for seed in range(int(sys.argv[1])):
    for r in list(reg.all_rules()):
        if r.fn.__module__.startswith("nngeo_ops.ops.rules"):
            reg._REGISTRY.remove(r.op, r.cls, r.name)
    order = mods[:]
    random.Random(seed).shuffle(order)
    for m in order:
        importlib.reload(importlib.import_module("nngeo_ops.ops.rules." + m))
    out.append(snapshot())
print(json.dumps(out))
"""


def battery():
    """Routines and rewrites chosen for expressions where several rules compete, with results."""
    g = torch.Generator().manual_seed(0)
    n = 12
    U = torch.randn(n, 2, dtype=F64, generator=g)
    d = torch.rand(n, dtype=F64, generator=g) + 0.5
    X = torch.randn(3, n, dtype=F64, generator=g)
    Xop = MatFree(lambda V: X @ V, (3, n), F64, rmatvec=lambda V: X.mT @ V, batched=True, name="X")
    A, B = torch.randn(3, 3, dtype=F64, generator=g), torch.randn(4, 4, dtype=F64, generator=g)
    exprs = {
        "woodbury": Diagonal(d) + LowRank(U),
        "function space": Xop.T @ Dense(spd(3, 1), psd=True) @ Xop + 0.5 * Identity(n),
        "sylvester": Kronecker(Dense(A), Dense(B)) + 2.0 * Identity(12),
        "shift": Kronecker(Dense(spd(3, 2), psd=True), Dense(spd(4, 3), psd=True))
        + 0.1 * Identity(12),
        "blockwise": BlockDiag([Dense(spd(2, 4), psd=True), Diagonal(d[:3])])
        + BlockDiag([Diagonal(d[:2]), Dense(spd(3, 5), psd=True)]),
        "congruence": Xop.T @ Dense(spd(3, 6), psd=True) @ Xop,
        "matfree": MatFree(
            lambda V: spd(n, 7) @ V, (n, n), F64, batched=True, symmetric=True, psd=True
        ),
        "power": Power(Kronecker(Dense(spd(3, 8), psd=True), Dense(spd(2, 9), psd=True)), -0.5),
    }
    out = {}
    for key, e in exprs.items():
        c = Compiled(e, CompilePolicy(dense_limit=5))
        vals = []
        for q in ("solve", "slogdet", "diag", "trace", "frobenius_norm"):
            try:
                v = (
                    c.solve(torch.ones(e.shape[0], dtype=F64))
                    if q == "solve"
                    else torch.stack(list(c.slogdet()))
                    if q == "slogdet"
                    else getattr(c, q)()
                )
                vals.append(v.reshape(-1).tolist())
            except Exception as err:  # the same refusal is part of the behaviour
                vals.append(type(err).__name__)
        out[key] = {"rewrites": c.rewrites, "routines": c.routines, "values": vals}
    return out


def test_shuffled_import_order_fires_the_same_rules():
    """Reloading the rule modules in random orders (so registering in those orders) changes neither
    the dispatch order nor which rule computes what, nor any value."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _SHUFFLE_SCRIPT, "3", str(REPO)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(runs) == 4
    for run in runs[1:]:
        assert run["table"] == runs[0]["table"]
        for key, rec in run["battery"].items():
            ref = runs[0]["battery"][key]
            assert rec["rewrites"] == ref["rewrites"] and rec["routines"] == ref["routines"], key
            assert rec["values"] == ref["values"], key


# ------------------------------------------------------------------------------ memo
def test_memo_computes_once_per_key_and_node():
    A, B = Dense(spd(3, 0)), Dense(spd(3, 1))
    c = Compiled(A)
    calls = []

    def factory(tag):
        def f():
            calls.append(tag)
            return None if tag == "none" else tag

        return f

    assert c.memo("k", A, factory("a")) == "a"
    assert c.memo("k", A, factory("a again")) == "a"
    assert c.memo("k", B, factory("b")) == "b"
    assert c.memo(("k", 2), A, factory("a2")) == "a2"
    assert c.memo("n", A, factory("none")) is None
    assert c.memo("n", A, factory("none")) is None  # None is a result too
    assert calls == ["a", "b", "a2", "none"]

    def boom():
        raise RuntimeError("not memoised")

    with pytest.raises(RuntimeError):
        c.memo("e", A, boom)
    assert c.memo("e", A, factory("e")) == "e"


def test_woodbury_pieces_are_computed_once_for_solve_and_logdet(monkeypatch):
    counted = []
    real = woodbury._woodbury_parts
    monkeypatch.setattr(
        woodbury, "_woodbury_parts", lambda node, ctx: counted.append(1) or real(node, ctx)
    )
    g = torch.Generator().manual_seed(1)
    d, U = torch.rand(30, dtype=F64, generator=g) + 0.5, torch.randn(30, 3, dtype=F64, generator=g)
    c = (Diagonal(d) + LowRank(U)).compile()
    b = torch.randn(30, dtype=F64, generator=g)
    D = torch.diag(d) + U @ U.mT
    torch.testing.assert_close(c.solve(b), torch.linalg.solve(D, b))
    torch.testing.assert_close(c.logdet(), torch.logdet(D))
    assert len(counted) == 1


# ------------------------------------------------------------------------------ Woodbury pieces
def test_woodbury_parts_fields_against_dense():
    g = torch.Generator().manual_seed(2)
    n, r = 20, 3
    d = torch.rand(n, dtype=F64, generator=g) + 0.5
    U, V = torch.randn(n, r, dtype=F64, generator=g), torch.randn(n, r, dtype=F64, generator=g)
    C = torch.randn(r, r, dtype=F64, generator=g)
    c = (Diagonal(d) + LowRank(U, C, V)).compile()
    parts = woodbury_parts(c.simplified, c)
    assert isinstance(parts, WoodburyParts)
    with pytest.raises(FrozenInstanceError):
        parts.C = C
    Binv = torch.diag(1.0 / d)
    torch.testing.assert_close(parts.B.to_dense(), torch.diag(d))
    torch.testing.assert_close(parts.solve_B(U), Binv @ U)
    torch.testing.assert_close(parts.BinvU, Binv @ U)
    torch.testing.assert_close(parts.C, C)
    torch.testing.assert_close(parts.V, V)
    S = torch.eye(r, dtype=F64) + C @ V.mT @ Binv @ U
    torch.testing.assert_close(parts.capacitance, S)
    LU, piv = parts.lu
    P, L, Uf = torch.lu_unpack(LU, piv)
    torch.testing.assert_close(P @ L @ Uf, S)
    assert woodbury_parts(c.simplified, c) is parts  # memoised
    assert woodbury_parts(Sum(Diagonal(d), Dense(spd(n, 0))), c) is None  # no low-rank term


def test_wide_congruence_parts_fields_against_dense():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(3, 9, dtype=F64, generator=g)
    M = spd(3, 4)
    Xop = MatFree(lambda V: X @ V, (3, 9), F64, rmatvec=lambda V: X.mT @ V, batched=True)
    c = (Xop.T @ Dense(M, psd=True) @ Xop + 0.25 * Identity(9)).compile()
    parts = wide_congruence_parts(c.simplified, c)
    assert isinstance(parts, WideCongruenceParts)
    with pytest.raises(FrozenInstanceError):
        parts.c = 1.0
    torch.testing.assert_close(parts.M, M)
    assert float(parts.c) == 0.25
    torch.testing.assert_close(parts.system, 0.25 * torch.eye(3, dtype=F64) + X @ X.mT @ M)
    b = torch.randn(9, dtype=F64, generator=g)
    D = X.mT @ M @ X + 0.25 * torch.eye(9, dtype=F64)
    torch.testing.assert_close(c.solve(b), torch.linalg.solve(D, b))
    torch.testing.assert_close(c.logdet(), torch.logdet(D))


# ------------------------------------------------------------------------------ power rules
def _mpow(D, p):
    e, Q = torch.linalg.eigh(D)
    return Q @ torch.diag(e**p) @ Q.mT


def test_each_node_kind_has_its_power_rule():
    kinds = {
        r.cls for r in all_rules() if r.op == "power"
    }  # the isinstance chain became these registrations
    assert {
        Power,
        ScaledIdentity,
        Diagonal,
        Eigen,
        BlockDiag,
        Kronecker,
        Scale,
        Product,
        Inverse,
        LinearOperator,
    } <= kinds


def _matfree_spd(n, seed):
    D = spd(n, seed)
    return MatFree(
        lambda V: D @ V, (n, n), F64, batched=True, symmetric=True, psd=True, name="S"
    ), D


KINDS = {
    "diagonal": (lambda: Diagonal(torch.rand(6, dtype=F64) + 0.5), Diagonal),
    "identity": (lambda: ScaledIdentity(2.0, 6, F64), ScaledIdentity),
    "eigen": (lambda: Dense(spd(6, 0), psd=True).eigh(), Eigen),
    "blockdiag": (
        lambda: BlockDiag([Dense(spd(2, 1), psd=True), Dense(spd(4, 2), psd=True)]),
        BlockDiag,
    ),
    "kronecker": (
        lambda: Kronecker(Dense(spd(2, 3), psd=True), Dense(spd(3, 4), psd=True)),
        Kronecker,
    ),
    "scale": (lambda: Scale(3.0, _matfree_spd(6, 5)[0]), Scale),
    "inverse": (lambda: Inverse(Dense(spd(6, 6), psd=True)), Inverse),
    "power": (lambda: Power(Dense(spd(6, 7), psd=True), 2.0), Power),
    "dense": (lambda: Dense(spd(6, 8), psd=True), LinearOperator),
    "matfree": (lambda: _matfree_spd(6, 9)[0], LinearOperator),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("p", [0.5, -0.5, 2.0, -2.0])
def test_power_rule_of_each_kind_against_dense(kind, p):
    make, cls = KINDS[kind]
    X = make()
    node = Power(X, p)
    ctx = Compiled(Identity(1, dtype=F64))
    # the rule registered on the kind itself fires (not one inherited from a base class)
    first = next(r for r in reg.rules_for("power", type(X)) if r.fn(node, ctx) is not None)
    assert first.cls is cls
    out = first.fn(node, ctx)
    torch.testing.assert_close(out.to_dense(), _mpow(X.to_dense(), p))
    # and the whole compile agrees with the dense matrix power
    c = Compiled(node)
    torch.testing.assert_close(c.simplified.to_dense(), _mpow(X.to_dense(), p))
    assert "structured power" in [name for name, *_ in c.rewrites]


def test_power_of_a_truncated_spectrum_stays_symbolic():
    Q = torch.linalg.qr(torch.randn(6, 2, dtype=F64))[0]
    E = Eigen(Dense(Q), torch.tensor([1.0, 2.0], dtype=F64))
    c = Compiled(Power(E, -0.5))
    assert isinstance(c.simplified, Power) and isinstance(c.simplified.child, Eigen)


def test_a_new_kind_registers_its_own_power_rule(private_registry):
    class Doubled(Diagonal):
        """A Diagonal subclass with a power rule of its own."""

    seen = []

    @rule("power", Doubled, name="power of a doubled diagonal")
    def doubled_power(node, ctx):
        seen.append(node.p)
        return Diagonal(node.child.d**node.p)

    d = torch.rand(5, dtype=F64) + 0.5
    c = Compiled(Power(Doubled(d), 3.0))
    assert seen == [3.0]  # the subclass's rule comes before Diagonal's (MRO)
    torch.testing.assert_close(c.simplified.to_dense(), torch.diag(d**3))
    # a plain Diagonal is untouched by it
    Compiled(Power(Diagonal(d), 3.0))
    assert seen == [3.0]


def test_orthogonal_congruence_power_keeps_the_basis():
    Q = torch.linalg.qr(torch.randn(5, 5, dtype=F64))[0]
    Qn = Dense(Q, orthogonal=True)
    M = Dense(spd(5, 9), psd=True)
    c = Compiled(Power(Product(Qn.T, M, Qn), 0.5))
    torch.testing.assert_close(c.simplified.to_dense(), _mpow(Q.mT @ spd(5, 9) @ Q, 0.5))


# ------------------------------------------------------------------------------ deprecations
def test_compile_policy_generator_is_a_deprecated_alias_of_rng():
    pol = CompilePolicy(seed=7)
    with pytest.warns(DeprecationWarning, match="CompilePolicy.rng"):
        g = pol.generator(torch.device("cpu"))
    assert torch.equal(torch.randn(4, generator=g), torch.randn(4, generator=pol.rng("cpu")))


def test_sum_is_in_the_registry_for_every_quantity():
    for op in ("solve", "slogdet"):
        assert reg._REGISTRY.on_class(op, Sum), op
