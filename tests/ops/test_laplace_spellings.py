"""The Laplace form of KFAC, ``N·F + prior``, in every spelling, on the exact route.

A posterior precision is written ``N·F + δ·I``, ``N·(F + (δ/N)·I)``, ``δ·I + F·N`` or with a
per-layer prior ``N·F + BlockDiag[δ₁·I, δ₂·I]``; F is a KFAC-shaped ``BlockDiag`` whose blocks are
permuted Kronecker products ``Pᵀ·(G⊗A)·P``. Every spelling must reach the shifted Kronecker
eigenvalues: the generic suite runs on each (small, so the dense twin is cheap), and the exact-route
tests compile with ``dense_limit=0`` so that no dense fallback can hide a missing rule. The last
test builds a real ``PMatKFAC`` above the default ``dense_limit``.
"""

from __future__ import annotations

import pytest
import torch

from nngeo_ops.ops import BlockDiag, CompilePolicy, Identity

from .suite import OperatorSuite
from .test_random_trees import _spd, laplace_spelling

F64 = torch.float64
SPELLINGS = ("N·F + δ·I", "N·(F + δ/N·I)", "N·F + BlockDiag[δ_l·I]", "δ·I + F·N")


class TestLaplaceSpellings(OperatorSuite):
    symmetric = psd = True
    seeds = (0, 1, 2, 3)  # the seed picks the spelling

    def params(self, dtype, gen):
        self._which = self._seed
        return [torch.randn(s, s, generator=gen, dtype=F64) for s in (2, 3, 2, 3)]

    def case(self, seed, dtype=F64, grad=False):
        self._seed = seed
        return super().case(seed, dtype, grad)

    def build(self, p):
        return laplace_spelling(self._which, *[_spd(t) for t in p], N=3.0, deltas=(0.2, 0.7))


def _factors(seed, sizes=(4, 6, 3, 5)):
    g = torch.Generator().manual_seed(seed)
    return [_spd(torch.randn(s, s, generator=g, dtype=F64)) for s in sizes]


def _not_exact(c):
    return [(op, node, r) for op, node, r in c.routines if "fallback" in r or "estimate" in r]


@pytest.mark.parametrize("which", range(4), ids=SPELLINGS)
def test_exact_route_without_dense_fallback(which):
    (
        op,
        dense,
    ) = laplace_spelling(which, *_factors(which), N=50.0, deltas=(0.3, 2.0))
    c = op.compile(CompilePolicy(dense_limit=0))
    b = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(1), dtype=F64)
    torch.testing.assert_close(c.logdet(), torch.logdet(dense))
    torch.testing.assert_close(c.solve(b), torch.linalg.solve(dense, b))
    inv = op.inv().compile(CompilePolicy(dense_limit=0))
    torch.testing.assert_close(inv.diag(), torch.linalg.inv(dense).diagonal())
    assert _not_exact(c) == [] and _not_exact(inv) == []
    assert "Eig[" in str(c.simplified) and "absorb shift" in c.explain()


@pytest.mark.parametrize("which", range(4), ids=SPELLINGS)
def test_gradient_in_the_prior_precision(which):
    G, A, G2, A2 = _factors(10 + which)
    d1 = torch.tensor(0.3, dtype=F64, requires_grad=True)
    d2 = torch.tensor(2.0, dtype=F64, requires_grad=True)
    N = torch.tensor(40.0, dtype=F64, requires_grad=True)
    op, dense = laplace_spelling(which, G, A, G2, A2, N=N, deltas=(d1, d2))
    c = op.compile(CompilePolicy(dense_limit=0))
    got = torch.autograd.grad(c.logdet(), (N, d1, d2), allow_unused=True)
    want = torch.autograd.grad(torch.logdet(dense), (N, d1, d2), allow_unused=True)
    for a, b in zip(got, want):
        if b is not None:
            torch.testing.assert_close(a, b)
    assert _not_exact(c) == []


def test_pmat_kfac_laplace_above_dense_limit():
    """An MLP 56-56-4 (P = 3420 > dense_limit): exact logdet, solve and inv().diag() for the three
    spellings of the issue, against the dense float64 matrix."""
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    from nngeo_ops.nn import FIM, PMatKFAC

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(56, 56), nn.Tanh(), nn.Linear(56, 4)).double()
    x, y = torch.randn(64, 56, dtype=F64), torch.randint(0, 4, (64,))
    F = FIM(model, DataLoader(TensorDataset(x, y), batch_size=32), PMatKFAC, progress=False)
    P = F.op.shape[0]
    assert P > CompilePolicy().dense_limit
    N, delta = 64.0, torch.tensor(0.5, dtype=F64, requires_grad=True)
    Fd = F.op.to_dense()
    with torch.no_grad():
        D = N * Fd + 0.5 * torch.eye(P, dtype=F64)
        L = torch.linalg.cholesky(D)
        logdet = 2 * L.diagonal().log().sum()
        inv_diag = torch.cholesky_inverse(L).diagonal()
    b = torch.randn(P, dtype=F64)
    sizes = [blk.shape[0] for blk in F.op.blocks]
    for expr in (
        N * F.op + delta * Identity(P),
        (N * F).add_identity(delta).op,
        N * F.op + BlockDiag([delta * Identity(n) for n in sizes]),
    ):
        c = expr.compile()
        ld = c.logdet()
        torch.testing.assert_close(ld.detach(), logdet)
        torch.testing.assert_close(c.solve(b).detach(), torch.cholesky_solve(b[:, None], L)[:, 0])
        assert _not_exact(c) == []
        # d logdet / dδ = tr((N·F + δ·I)⁻¹)
        (g,) = torch.autograd.grad(ld, delta)
        torch.testing.assert_close(g, inv_diag.sum())
        with torch.no_grad():
            ci = expr.inv().compile()
            torch.testing.assert_close(ci.diag(), inv_diag)
            assert _not_exact(ci) == []
