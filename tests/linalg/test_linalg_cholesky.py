"""cholesky_solve: two triangular solves with the factor read in place, against the dense solve."""

import pytest
import torch

from nngeo_ops.linalg import cholesky_solve


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("layout", ["contiguous", "column-major"])
def test_cholesky_solve_is_the_dense_solve(k, layout):
    torch.manual_seed(k)
    n = 40
    M = torch.randn(n, n, dtype=torch.float64)
    A = M @ M.T + n * torch.eye(n, dtype=torch.float64)
    L = torch.linalg.cholesky(A)
    L = L.contiguous() if layout == "contiguous" else L.mT.contiguous().mT
    B = torch.randn(n, k, dtype=torch.float64)
    X = cholesky_solve(B, L)
    torch.testing.assert_close(X, torch.linalg.solve(A, B))
    torch.testing.assert_close(X, torch.cholesky_solve(B, L), rtol=0, atol=1e-14)
