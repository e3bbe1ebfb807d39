"""The algorithms of nngeo_ops.linalg and scipy's solvers run on operator nodes directly."""

from __future__ import annotations

import numpy as np
import scipy.sparse.linalg as spla
import torch

from nngeo_ops.linalg import cg, hutchpp, lanczos, power_iteration, slq_logdet, xtrace
from nngeo_ops.ops import BlockDiag, Dense, Diagonal, Identity, Kronecker, LowRank

F64 = torch.float64


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=F64)
    return B @ B.mT / n + 0.1 * torch.eye(n, dtype=F64)


def kfac(seed=0):
    A, G, B = spd(6, seed), spd(5, seed + 1), spd(4, seed + 2)
    op = BlockDiag([Kronecker(Dense(G, psd=True), Dense(A, psd=True)), Dense(B, psd=True)])
    return op, torch.block_diag(torch.kron(G, A), B)


def test_cg_on_a_damped_kronecker_node():
    op, D = kfac()
    damped = op + 0.05 * Identity(34)
    B = torch.randn(34, 3, dtype=F64)
    X, info = cg(damped, B, tol=1e-12)
    assert info.all_converged
    torch.testing.assert_close(X, torch.linalg.solve(D + 0.05 * torch.eye(34, dtype=F64), B))


def test_lanczos_and_power_iteration_on_nodes():
    op, D = kfac(3)
    ev, vecs = lanczos(op, 3, which="LA", num_iter=34, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ev, torch.linalg.eigvalsh(D)[-3:])
    torch.testing.assert_close(op @ vecs, vecs * ev, atol=1e-8, rtol=1e-6)
    lam, v = power_iteration(
        op, num_iter=2000, tol=1e-12, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(lam, torch.linalg.eigvalsh(D)[-1], rtol=1e-6, atol=1e-8)


def test_trace_and_logdet_estimators_on_nodes():
    op, D = kfac(5)
    g = torch.Generator().manual_seed(0)
    # with at least n matvecs Hutch++/XTrace are exact; below that they are unbiased estimates
    torch.testing.assert_close(torch.as_tensor(hutchpp(op, 40, generator=g)[0]), D.trace())
    est = xtrace(op, 30, generator=g)
    assert abs(float(est[0]) - float(D.trace())) < 5 * float(est[1]) + 1e-8
    damped = op + 0.5 * Identity(34)
    val, se = slq_logdet(damped, num_probes=64, num_iter=34, generator=g)
    truth = torch.logdet(D + 0.5 * torch.eye(34, dtype=F64))
    assert abs(float(val) - float(truth)) < 4 * float(se) + 1e-6


def test_scipy_solvers_and_shift_invert_on_nodes():
    op, D = kfac(7)
    damped = op + 0.1 * Identity(34)
    Dd = (D + 0.1 * torch.eye(34, dtype=F64)).numpy()
    L = damped.to_scipy()
    b = np.random.default_rng(0).standard_normal(34)
    x, info = spla.cg(L, b, rtol=1e-12)
    assert info == 0 and np.allclose(Dd @ x, b, atol=1e-8)
    x, info = spla.minres(L, b, rtol=1e-12)
    assert info == 0 and np.allclose(Dd @ x, b, atol=1e-6)
    X0 = np.random.default_rng(1).standard_normal((34, 2))
    vals, _ = spla.lobpcg(L, X0, largest=True, tol=1e-9, maxiter=500)
    np.testing.assert_allclose(np.sort(vals), np.linalg.eigvalsh(Dd)[-2:], rtol=1e-6)
    # shift-invert: eigenvalues nearest sigma through the structured inverse of (A - σI)
    sigma = 0.3
    OPinv = damped.to_scipy_inverse(sigma=sigma)
    vals = spla.eigsh(L, k=2, sigma=sigma, OPinv=OPinv, return_eigenvectors=False)
    ref = np.linalg.eigvalsh(Dd)
    nearest = ref[np.argsort(np.abs(ref - sigma))[:2]]
    np.testing.assert_allclose(np.sort(vals), np.sort(nearest), rtol=1e-8)


def test_woodbury_node_in_scipy_cg():
    d = torch.rand(50, dtype=F64) + 1
    U = torch.randn(50, 3, dtype=F64)
    op = Diagonal(d) + LowRank(U)
    x, info = spla.cg(op.to_scipy(), np.ones(50), rtol=1e-12)
    np.testing.assert_allclose(x, op.solve(torch.ones(50, dtype=F64)).numpy(), rtol=1e-8)
