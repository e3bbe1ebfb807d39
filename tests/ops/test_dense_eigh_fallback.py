"""Dense eigendecomposition when LAPACK's divide-and-conquer does not converge.

The failure seen in practice (a float64 Fisher block of a saturated softmax, entries ~1e-117) is
not reproducible on demand, so ``torch.linalg.eigh`` is made to fail; the result is checked against
numpy's eigenvalues and the reconstruction Q diag(λ) Qᵀ = M."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nngeo_ops.ops import Dense

_real_eigh = torch.linalg.eigh


def _matrix(scale: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 12, generator=g, dtype=torch.float64)
    S = torch.randn(40, 40, generator=g, dtype=torch.float64)
    return (X @ X.T - 0.3 * (S + S.T)) * scale  # indefinite, with a repeated-ish spectrum


def _check(M: torch.Tensor, evals: torch.Tensor, Q: torch.Tensor) -> None:
    ref = np.linalg.eigvalsh(M.numpy())
    np.testing.assert_allclose(evals.numpy(), ref, rtol=1e-10, atol=1e-12 * abs(ref).max())
    torch.testing.assert_close(
        Q @ torch.diag(evals) @ Q.T, M, rtol=1e-10, atol=1e-12 * M.abs().max()
    )


@pytest.mark.parametrize("scale", [1.0, 1e-117])
def test_unscaled_failure_is_retried_scaled(monkeypatch, scale):
    M = _matrix(scale)

    def eigh(A, *args, **kwargs):  # fails unless the largest entry is 1 (the scaled retry)
        if not bool(torch.isclose(A.abs().max(), torch.ones((), dtype=A.dtype))):
            raise torch.linalg.LinAlgError("did not converge")
        return _real_eigh(A, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    evals, Q = Dense(M, symmetric=True).eigh_factors()
    _check(M, evals, Q)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qr_iteration_when_every_eigh_fails(monkeypatch, dtype):
    M = _matrix(1e-117 if dtype == torch.float64 else 1e-3).to(dtype)

    def eigh(A, *args, **kwargs):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigh", eigh)
    evals, Q = Dense(M, symmetric=True).eigh_factors()
    assert evals.dtype == dtype and Q.dtype == dtype
    if dtype == torch.float64:
        _check(M, evals, Q)
    else:
        ref = np.linalg.eigvalsh(M.double().numpy())
        np.testing.assert_allclose(evals.double().numpy(), ref, atol=1e-5 * abs(ref).max())
