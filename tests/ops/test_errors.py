"""Bad input raises a clear exception from the library's hierarchy."""

from __future__ import annotations

import pytest
import torch

from nngeo_ops.errors import (
    DTypeDeviceError,
    NNGeoError,
    NotPSDError,
    NotSymmetricError,
    ShapeError,
    SingularError,
)
from nngeo_ops.ops import Dense, Diagonal, Eigen, Identity, Kronecker, LowRank

F64 = torch.float64


def test_mismatched_shapes():
    with pytest.raises(ShapeError, match=r"\(3, 3\).*\(4, 4\)"):
        Dense(torch.eye(3, dtype=F64)) + Dense(torch.eye(4, dtype=F64))
    with pytest.raises(ShapeError, match="multiply"):
        Dense(torch.ones(3, 2, dtype=F64)) @ Dense(torch.ones(3, 2, dtype=F64))
    with pytest.raises(ShapeError, match="non-square"):
        Dense(torch.ones(3, 2, dtype=F64)).inv()
    with pytest.raises(ShapeError, match="length 3"):
        Dense(torch.eye(3, dtype=F64)).solve(torch.ones(4, dtype=F64))
    with pytest.raises(ShapeError, match="evals"):
        Eigen(torch.eye(3, dtype=F64), torch.ones(2, dtype=F64))
    with pytest.raises(ShapeError):
        LowRank(torch.ones(4, 2, dtype=F64), torch.ones(3, 3, dtype=F64))


def test_dtype_and_device_mixes():
    with pytest.raises(DTypeDeviceError, match=r"\.to\("):
        Dense(torch.eye(3, dtype=F64)) + Dense(torch.eye(3, dtype=torch.float32))
    with pytest.raises(TypeError, match="float32"):
        Kronecker(torch.eye(2, dtype=F64), torch.eye(2, dtype=torch.float32))
    with pytest.raises(DTypeDeviceError):
        Diagonal(torch.ones(3, dtype=F64)) @ torch.ones(3, dtype=torch.float32)
    # an identity built without a dtype adapts instead of failing
    assert (Diagonal(torch.ones(3)) + Identity(3)).dtype == torch.float32
    assert (Diagonal(torch.ones(3, dtype=F64)) + Identity(3)).dtype == F64


def test_logdet_and_cholesky_of_non_psd():
    M = torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=F64)  # eigenvalues 3 and -1
    with pytest.raises(NotPSDError, match="negative"):
        Dense(M).logdet()
    with pytest.raises(NotPSDError, match="not positive definite"):
        Dense(M, psd=True).solve(torch.ones(2, dtype=F64))
    with pytest.raises(NotPSDError, match="damping"):
        Dense(M, psd=True).logdet()
    with pytest.raises(NotPSDError, match="non-integer power"):
        Dense(M).sqrt().to_dense()
    assert issubclass(NotPSDError, (NNGeoError, ValueError))


def test_pow_of_non_symmetric():
    M = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=F64)
    with pytest.raises(NotSymmetricError, match="symmetric"):
        Dense(M).pow(0.5)
    with pytest.raises(NotSymmetricError):
        Dense(M).eigh()


def test_singular_solves():
    with pytest.raises(SingularError, match="damping"):
        Diagonal(torch.tensor([1.0, 0.0], dtype=F64)).solve(torch.ones(2, dtype=F64))
    with pytest.raises(SingularError, match="truncated"):
        Eigen(torch.eye(3, 2, dtype=F64), torch.ones(2, dtype=F64)).solve(torch.ones(3, dtype=F64))
    with pytest.raises(SingularError):
        Dense(torch.ones(2, 2, dtype=F64)).solve(torch.ones(2, dtype=F64))


def test_scalar_addition_is_refused_with_a_hint():
    with pytest.raises(TypeError, match="Identity"):
        Dense(torch.eye(2, dtype=F64)) + 1.0


def test_non_finite_matrix():
    from nngeo_ops.errors import NonFiniteError

    M = torch.eye(2, dtype=F64)
    M[0, 1] = float("nan")
    with pytest.raises(NonFiniteError, match="NaN"):
        Dense(M).solve(torch.ones(2, dtype=F64))


@pytest.mark.parametrize("chunk", [7, 1 << 22])
def test_symmetry_tag_checked_block_by_block(monkeypatch, chunk):
    # the check forms M − Mᵀ a few rows at a time (chunk entries): an asymmetric entry in any
    # block, above or below the diagonal, is refused; a symmetric matrix, or one asymmetric to
    # round-off, is accepted
    from nngeo_ops.ops import leaf_checks as base

    monkeypatch.setattr(base, "_SYMMETRY_CHUNK", chunk)
    torch.manual_seed(0)
    R = torch.randn(9, 9, dtype=F64)
    S = R + R.T
    Dense(S, psd=False, symmetric=True)
    Dense(S + 1e-12 * torch.triu(torch.ones(9, 9, dtype=F64), 1), symmetric=True)
    for i, j in [(0, 8), (8, 0), (4, 5), (6, 2)]:
        bad = S.clone()
        bad[i, j] += 1.0
        with pytest.raises(NotSymmetricError, match="max"):
            Dense(bad, symmetric=True)


def test_symmetric_tag_survives_a_change_of_precision():
    """A float32 matrix tagged symmetric, with float32 round-off in its symmetry (as a Gram matrix
    computed in float32 has), converts to float64 with its tags and values: the tag was verified at
    float32's tolerance, and a check at float64's would refuse the conversion."""
    g = torch.Generator().manual_seed(0)
    S = torch.randn(12, 12, generator=g, dtype=F64)
    S = S @ S.T
    S32 = (S + 1e-6 * torch.triu(torch.ones(12, 12, dtype=F64), 1)).to(torch.float32)
    A = Dense(S32, psd=True, name="G")
    with pytest.raises(NotSymmetricError):  # the float64 tolerance alone refuses these values
        Dense(S32.to(F64), psd=True)
    B = (A + 0.5 * Identity(12, dtype=torch.float32)).to(F64)
    assert B.dtype == F64 and B.symmetric and B.psd
    dense = S32.to(F64) + 0.5 * torch.eye(12, dtype=F64)
    torch.testing.assert_close(B.to_dense(), dense, rtol=0, atol=0)
    x = torch.randn(12, generator=g, dtype=F64)
    # a PSD solve reads one triangle: it matches the general solve up to the 1e-6 asymmetry
    torch.testing.assert_close(B.solve(x), torch.linalg.solve(dense, x), rtol=1e-5, atol=1e-5)
    back = A.to(torch.float32)
    assert back.psd and torch.equal(back.to_dense(), S32)
