"""Dense products of one column read one triangle (``linalg.symv``) exactly when M = Mᵀ bitwise
and M is unchanged since that was seen; otherwise torch's product over the whole matrix."""

from __future__ import annotations

import pytest
import torch

from nngeo_ops.linalg import symv as S
from nngeo_ops.ops import BlockDiag, Dense, Identity
from nngeo_ops.ops import dense as dense_module

N = S.SYMV_MIN_SIZE + 8


@pytest.fixture
def calls(monkeypatch):
    seen = []
    real = dense_module.symv

    def spy(M, x, out=None):
        seen.append(M.shape[0])
        return real(M, x, out=out)

    monkeypatch.setattr(dense_module, "symv", spy)
    return seen


def sym(n=N, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return (A + A.mT) / 2


def vec(n=N, k=None):
    return (
        torch.randn(n, dtype=torch.float64) if k is None else torch.randn(n, k, dtype=torch.float64)
    )


def test_exactly_symmetric_products_read_one_triangle(calls):
    M, x = sym(), vec()
    for op in (Dense(M, symmetric=True), Dense(M, psd=False, symmetric=None), Dense(M)):
        calls.clear()
        torch.testing.assert_close(op @ x, M @ x, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(op @ x[:, None], M @ x[:, None], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(op.T @ x, M @ x, rtol=1e-12, atol=1e-12)
        out = torch.empty(N, dtype=torch.float64)
        op.matvec(x, out=out)
        torch.testing.assert_close(out, M @ x, rtol=1e-12, atol=1e-12)
        assert calls == [N] * 4
    # several columns stay one GEMM (symv would read the matrix once per column)
    calls.clear()
    X = vec(k=3)
    torch.testing.assert_close(Dense(M, symmetric=True) @ X, M @ X, rtol=1e-12, atol=1e-12)
    assert calls == []


def test_symmetric_to_a_tolerance_keeps_the_full_product(calls):
    M = sym()
    P = M @ M.mT / N + torch.eye(N, dtype=torch.float64)
    for A in (M, P):
        A[0, 1] += 1e-12  # accepted by the tag's tolerance, but symv would read only one of the two
    x = vec()
    # the tag given, or implied by psd=True (symmetric left at None)
    for op in (Dense(M, symmetric=True), Dense(P, psd=True), Dense(P, psd=True, symmetric=True)):
        assert torch.equal(op @ x, op.M @ x)
    assert calls == []


def test_an_in_place_change_turns_the_route_off(calls):
    M, x = sym(), vec()
    op = Dense(M, symmetric=True)
    op @ x
    assert calls == [N]
    M[0, 1] += 1.0  # a new version of M: no longer known to be symmetric bitwise
    calls.clear()
    assert torch.equal(op @ x, M @ x)
    assert calls == []


def test_conversion_keeps_the_route_and_grad_takes_torchs_product(calls):
    M, x = sym(), vec()
    op32 = Dense(M, symmetric=True).to(torch.float32)
    y = op32 @ x.float()
    assert calls == [N]
    torch.testing.assert_close(
        y.double(), M.float().double() @ x.float().double(), rtol=1e-5, atol=1e-4
    )
    calls.clear()
    w = M.clone().requires_grad_(True)
    op = Dense(w, symmetric=True)
    (op @ x).sum().backward()
    assert calls == []
    torch.testing.assert_close(
        w.grad, torch.ones(N, 1, dtype=torch.float64) @ x[None], rtol=0, atol=0
    )


def test_block_diagonal_and_damped_products(calls):
    M1, M2, x = sym(N, 1), sym(N + 3, 2), vec(2 * N + 3)
    B = BlockDiag([Dense(M1, psd=False, symmetric=True), Dense(M2, symmetric=True)])
    ref = torch.cat([M1 @ x[:N], M2 @ x[N:]])
    torch.testing.assert_close(B @ x, ref, rtol=1e-12, atol=1e-12)
    assert sorted(calls) == [N, N + 3]
    D = Dense(M1, symmetric=True) + 0.5 * Identity(N)
    torch.testing.assert_close(D @ x[:N], M1 @ x[:N] + 0.5 * x[:N], rtol=1e-12, atol=1e-12)
