"""The shifted thin eigen form (ops/rules/thin_shift.py): ``G ⊗ A + c·I`` with a low-rank factor,
solved and log-determined over a thin basis, against dense torch ground truth; above the dense
limit (default policy, and a small policy whose limit the cases exceed); with averaged (stacked)
low-rank factors; through the generic operator suite."""

from __future__ import annotations

import math

import pytest
import torch

from nngeo_ops.ops import (
    CompilePolicy,
    Dense,
    Identity,
    Kronecker,
    LowRank,
    Permutation,
)
from nngeo_ops.ops.cache import FACTORIZATIONS

from .suite import OperatorSuite, rnd, spd

F64 = torch.float64
THIN = "shifted thin eigen form"


def damped_kron(G, U, c, policy=None):
    """(G ⊗ UUᵀ + c·I) as a node, compiled, and its dense twin."""
    op = Kronecker(Dense(G, psd=True, name="G"), LowRank(U, name="A")) + c * Identity(
        G.shape[0] * U.shape[0], dtype=U.dtype
    )
    dense = torch.kron(G, U @ U.mT) + c * torch.eye(op.shape[0], dtype=U.dtype)
    return op, op.compile(policy), dense


@pytest.mark.parametrize("c", [0.3, 1e-4])
def test_solve_logdet_diag_trace_against_dense_above_a_small_dense_limit(c):
    g = torch.Generator().manual_seed(0)
    G, U = spd(rnd(g, 4, 4)), rnd(g, 40, 6)  # n = 160 > dense_limit = 50: no dense fallback
    op, comp, dense = damped_kron(G, U, c, CompilePolicy(dense_limit=50))
    v = rnd(g, 160, 3)
    torch.testing.assert_close(comp.solve(v), torch.linalg.solve(dense, v))
    torch.testing.assert_close(comp.logdet(), torch.logdet(dense))
    torch.testing.assert_close(comp.diag(), dense.diagonal())
    torch.testing.assert_close(comp.trace(), dense.trace())
    assert THIN in comp.routine("solve") and THIN in comp.routine("slogdet")
    text = comp.explain()
    assert "Q₁_A" in text and THIN in text  # the thin basis is shown by explain()


def test_no_complete_basis_is_formed_for_a_solve_or_a_logdet():
    g = torch.Generator().manual_seed(1)
    G, U = spd(rnd(g, 3, 3)), rnd(g, 30, 4)
    before = FACTORIZATIONS["eigh (complete)"]
    _, comp, dense = damped_kron(G, U, 0.2)
    comp.solve(rnd(g, 90))
    comp.logdet()
    assert FACTORIZATIONS["eigh (complete)"] == before


def test_eigh_completes_the_basis_and_powers_follow():
    g = torch.Generator().manual_seed(2)
    G, U = spd(rnd(g, 3, 3)), rnd(g, 7, 2)
    _, comp, dense = damped_kron(G, U, 0.5)
    E = comp.eigh()
    assert E.full
    torch.testing.assert_close(E.to_dense(), dense)
    ev, Q = torch.linalg.eigh(dense)
    ref = (Q * ev.rsqrt()) @ Q.mT
    op, _, _ = damped_kron(G, U, 0.5)
    torch.testing.assert_close(op.pow(-0.5).to_dense(), ref)


def test_above_the_default_dense_limit_against_torch():
    # n = 2 × 1601 = 3202 > CompilePolicy().dense_limit; ground truth without the route: the
    # products with the dense factor U Uᵀ (torch), and the log-determinant from the spectrum of the
    # small Gram matrix UᵀU (the nonzero eigenvalues of U Uᵀ) with those of G
    g = torch.Generator().manual_seed(3)
    m, r, c = 1601, 12, 0.05
    G, U = spd(rnd(g, 2, 2)), rnd(g, m, r)
    op, comp, _ = damped_kron(G, U, c)
    assert op.shape[0] > CompilePolicy().dense_limit
    v = rnd(g, 2 * m, 2)
    x = comp.solve(v)
    A = U @ U.mT
    X = x.T.reshape(2, 2, m)  # (column, row of G, row of A)
    back = torch.einsum("ij,kjl,ml->kim", G, X, A).reshape(2, -1).T + c * x
    torch.testing.assert_close(back, v)
    eg = torch.linalg.eigvalsh(G)
    ea = torch.linalg.eigvalsh(U.mT @ U)
    ref = torch.log(torch.outer(eg, ea) + c).sum() + 2 * (m - r) * math.log(c)
    torch.testing.assert_close(comp.logdet(), ref)
    assert THIN in comp.routine("solve")


def test_averaged_low_rank_factors_stay_thin_and_exact():
    # β·A₁ + (1 − β)·A₂ with A_i = R_iᵀ R_i is the low rank of the stacked rows [√β R₁; √(1−β) R₂]
    g = torch.Generator().manual_seed(4)
    beta, c = 0.9, 0.1
    R1, R2 = rnd(g, 5, 60), rnd(g, 5, 60)
    G = spd(rnd(g, 3, 3))
    rows = torch.cat([math.sqrt(beta) * R1, math.sqrt(1 - beta) * R2])
    op, comp, _ = damped_kron(G, rows.T, c, CompilePolicy(dense_limit=100))
    A = beta * R1.T @ R1 + (1 - beta) * R2.T @ R2
    dense = torch.kron(G, A) + c * torch.eye(180, dtype=F64)
    v = rnd(g, 180)
    torch.testing.assert_close(comp.solve(v), torch.linalg.solve(dense, v))
    torch.testing.assert_close(comp.logdet(), torch.logdet(dense))
    assert THIN in comp.routine("solve")


def test_float32_matches_float64_to_float32_accuracy():
    g = torch.Generator().manual_seed(5)
    G, U = spd(rnd(g, 4, 4)), rnd(g, 50, 5)
    _, comp, dense = damped_kron(G, U, 1e-3)
    _, comp32, _ = damped_kron(G.float(), U.float(), 1e-3)
    v = rnd(g, 200)
    ref = torch.linalg.solve(dense, v)
    torch.testing.assert_close(comp32.solve(v.float()).double(), ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(comp.solve(v), ref)


def test_gradients_match_the_dense_route():
    g = torch.Generator().manual_seed(6)
    U0, G = rnd(g, 9, 3), spd(rnd(g, 3, 3))
    v = rnd(g, 27)

    def loss(thin):
        U = U0.clone().requires_grad_(True)
        a = LowRank(U, name="A") if thin else Dense(U @ U.mT, psd=True)
        op = Kronecker(Dense(G, psd=True), a) + 0.2 * Identity(27, dtype=F64)
        out = op.solve(v).square().sum() + op.logdet()
        return out, torch.autograd.grad(out, U)[0]

    (o1, g1), (o2, g2) = loss(True), loss(False)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(g1, g2)


# ---------------------------------------------------------------------- the generic suite
class TestDampedKroneckerBothFactorsLowRank(OperatorSuite):
    """``(V Vᵀ) ⊗ (U Uᵀ) + c·I``: both bases thin."""

    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 4, 2), rnd(gen, 5, 2)]

    def build(self, p):
        V, U = p
        op = Kronecker(LowRank(V, name="G"), LowRank(U, name="A")) + 0.3 * Identity(20)
        return op, torch.kron(V @ V.mT, U @ U.mT) + 0.3 * torch.eye(20, dtype=U.dtype)


class TestScaledDampedKroneckerLowRankInParameterOrder(OperatorSuite):
    """``Pᵀ (N · G ⊗ U Uᵀ) P + c·I`` (a KFAC block in parameter order, scaled by a data size)."""

    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 3, 3), rnd(gen, 5, 2)]

    def build(self, p):
        G, U = spd(p[0]), p[1]
        perm = torch.tensor([3, 0, 14, 7, 1, 9, 12, 2, 4, 13, 5, 8, 10, 6, 11])
        P = Permutation(perm, dtype=U.dtype)
        K = Kronecker(Dense(G, psd=True), LowRank(U, name="A"))
        op = P.T @ (4.0 * K) @ P + 0.2 * Identity(15)
        Pd = P.to_dense()
        dense = Pd.T @ (4.0 * torch.kron(G, U @ U.mT)) @ Pd + 0.2 * torch.eye(15, dtype=U.dtype)
        return op, dense
