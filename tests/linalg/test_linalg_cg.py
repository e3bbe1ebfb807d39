"""Conjugate gradients against torch.linalg.solve."""

import warnings

import pytest
import torch

from nngeo_ops.errors import (
    ConvergenceWarning,
    DTypeDeviceError,
    NonFiniteError,
    NotPSDError,
    ShapeError,
)
from nngeo_ops.linalg import CGSettings, as_matmat, cg

DT = torch.float64


def spd(n, seed=0, cond_shift=0.5, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n, generator=g, dtype=dtype)
    A = X @ X.T / n + cond_shift * torch.eye(n, dtype=dtype)
    return (A + A.T) / 2


def rhs(n, k=None, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, generator=g, dtype=dtype)
        if k is None
        else torch.randn(n, k, generator=g, dtype=dtype)
    )


def test_single_rhs_matches_solve():
    A, b = spd(60), rhs(60)
    x, info = cg(A, b, tol=1e-10)
    assert x.shape == (60,)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-7, atol=1e-8)
    assert info.all_converged and info.converged.shape == (1,)
    assert info.residual_norms[0] <= 1e-10 * torch.linalg.norm(b) * 1.0001


def test_multi_rhs_columns_converge_independently():
    A = spd(60)
    B = rhs(60, 4)
    B[:, 1] *= 1e6  # scale must not matter for a relative tolerance
    B[:, 2] = 0  # a zero column is solved exactly and at once
    X, info = cg(A, B, tol=1e-10)
    torch.testing.assert_close(X, torch.linalg.solve(A, B), rtol=1e-7, atol=1e-8)
    assert info.all_converged
    assert info.column_iterations[2] == 0
    assert int(info.column_iterations.max()) == info.iterations
    true_res = torch.linalg.norm(B - A @ X, dim=0)
    torch.testing.assert_close(true_res, info.residual_norms, rtol=1e-3, atol=1e-6)


def test_callable_operator_and_x0():
    A, b = spd(40), rhs(40)
    exact = torch.linalg.solve(A, b)
    x, info = cg(lambda X: A @ X, b)
    torch.testing.assert_close(x, exact, rtol=1e-6, atol=1e-7)
    x, info = cg(A, b, x0=exact.clone())
    assert info.iterations <= 1
    torch.testing.assert_close(x, exact, rtol=1e-6, atol=1e-7)


def test_jacobi_preconditioner_needs_fewer_iterations():
    n = 80
    d = torch.logspace(0, 4, n, dtype=DT)
    C = spd(n, seed=3, cond_shift=1.0)
    A = d.sqrt()[:, None] * C * d.sqrt()[None, :]  # badly scaled SPD matrix
    b = rhs(n)
    exact = torch.linalg.solve(A, b)
    diag = torch.diagonal(A)
    x_p, info_p = cg(A, b, M=lambda R: R / diag[:, None], tol=1e-10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        x, info = cg(A, b, tol=1e-10, maxiter=2000)
    torch.testing.assert_close(x_p, exact, rtol=1e-6, atol=1e-8)
    assert info_p.all_converged
    assert info_p.iterations < info.iterations / 2
    # a tensor preconditioner M ≈ A⁻¹ is accepted as well
    _, info_t = cg(A, b, M=torch.diag(1 / diag), tol=1e-10)
    assert info_t.iterations == info_p.iterations


def test_not_psd_raises():
    A = torch.diag(torch.tensor([1.0, 2.0, -1.0, 3.0], dtype=DT))
    with pytest.raises(NotPSDError, match=r"not positive definite.*pᵀAp"):
        cg(A, torch.ones(4, dtype=DT))


def test_non_pd_preconditioner_raises():
    A = spd(10)
    with pytest.raises(NotPSDError, match="preconditioner"):
        cg(A, rhs(10), M=lambda R: -R)


def test_non_convergence_warns_and_reports():
    A, b = spd(50, cond_shift=1e-3), rhs(50)
    with pytest.warns(ConvergenceWarning, match="did not converge in 3 iterations"):
        x, info = cg(A, b, maxiter=3)
    assert not info.all_converged
    assert info.iterations == 3


def test_history_and_settings_object():
    A, b = spd(30), rhs(30, 2)
    s = CGSettings(tol=1e-6, record_history=True)
    _, info = cg(A, b, settings=s)
    assert len(info.history) == info.iterations + 1
    assert info.history[0].shape == (2,)
    assert bool((info.history[-1] <= info.history[0]).all())
    _, info2 = cg(A, b, settings=s, tol=1e-12)  # keyword overrides the settings object
    assert info2.iterations > info.iterations
    with pytest.raises(TypeError, match="unknown CGSettings option"):
        cg(A, b, tolerance=1e-3)
    with pytest.raises(ValueError, match="tol"):
        CGSettings(tol=-1.0)


def test_float32_stays_float32():
    A, b = spd(30, dtype=torch.float32), rhs(30, 3, dtype=torch.float32)
    X, info = cg(A, b, tol=1e-5)
    assert X.dtype == torch.float32
    assert info.all_converged
    torch.testing.assert_close(X, torch.linalg.solve(A, b), rtol=1e-3, atol=1e-4)


def test_bad_inputs():
    A = spd(5)
    with pytest.raises(ShapeError, match=r"A has shape \(5, 5\) but B has shape \(6,\)"):
        cg(A, torch.ones(6, dtype=DT))
    with pytest.raises(ShapeError, match="square"):
        cg(torch.ones(5, 4, dtype=DT), torch.ones(5, dtype=DT))
    with pytest.raises(DTypeDeviceError, match="convert B"):
        cg(A, torch.ones(5, dtype=torch.float32))
    with pytest.raises(NonFiniteError, match="B contains NaN"):
        cg(A, torch.full((5,), float("nan"), dtype=DT))
    with pytest.raises(ShapeError, match="x0"):
        cg(A, torch.ones(5, dtype=DT), x0=torch.ones(5, 1, dtype=DT))
    with pytest.raises(ShapeError, match="preconditioner M has shape"):
        cg(A, torch.ones(5, dtype=DT), M=torch.eye(4, dtype=DT))
    op = as_matmat(lambda X: X[:3], shape=(5, 5), dtype=DT)
    with pytest.raises(ShapeError, match="returned shape"):
        cg(op, torch.ones(5, dtype=DT))
