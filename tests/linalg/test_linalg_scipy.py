"""The scipy LinearOperator adapters, exercised through scipy's own solvers."""

import numpy as np
import pytest
import torch
from scipy.sparse.linalg import cg as scipy_cg
from scipy.sparse.linalg import eigsh, lobpcg, minres

from nngeo_ops.errors import ShapeError, SingularError, UnsupportedError
from nngeo_ops.linalg import TorchLinearOperator, inverse_to_scipy, to_scipy

DT = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def spd(n, seed=0, dtype=DT):
    X = torch.randn(n, n, generator=gen(seed), dtype=dtype)
    A = X @ X.T / n + 0.5 * torch.eye(n, dtype=dtype)
    return (A + A.T) / 2


class Node:
    """Duck-typed lazy node with a transpose and the library's ``solve(v, regul=λ)``."""

    def __init__(self, M):
        self.M = M
        self.shape = tuple(M.shape)
        self.dtype = M.dtype
        self.device = M.device
        self.solves = 0

    def __matmul__(self, X):
        return self.M @ X

    @property
    def T(self):
        return Node(self.M.mT)

    def solve(self, B, regul=0.0):
        self.solves += 1
        n = self.M.shape[0]
        return torch.linalg.solve(self.M + regul * torch.eye(n, dtype=self.M.dtype), B)


def test_products_and_dtype():
    A = torch.randn(6, 4, generator=gen(0), dtype=DT)
    op = to_scipy(A)
    assert isinstance(op, TorchLinearOperator)
    assert op.shape == (6, 4) and op.dtype == np.float64
    x, y = np.arange(4.0), np.arange(6.0)
    np.testing.assert_allclose(op.matvec(x), A.numpy() @ x)
    np.testing.assert_allclose(op.rmatvec(y), A.numpy().T @ y)
    np.testing.assert_allclose(op.matmat(np.eye(4)), A.numpy())
    np.testing.assert_allclose(op.H.matvec(y), A.numpy().T @ y)
    np.testing.assert_allclose(op @ (x + 1j * x), A.numpy() @ x + 1j * (A.numpy() @ x))
    op32 = to_scipy(A.float())
    assert op32.dtype == np.float32
    assert op32.matvec(x).dtype == np.float32


def test_eigsh_largest():
    A = spd(80)
    w = eigsh(to_scipy(A), k=4, which="LA", return_eigenvectors=False)
    np.testing.assert_allclose(np.sort(w), torch.linalg.eigvalsh(A)[-4:].numpy(), rtol=1e-8)


@pytest.mark.parametrize("source", ["lu", "node", "callable"])
def test_eigsh_shift_invert(source):
    A = spd(60, seed=1)
    sigma = 1.0
    if source == "lu":
        opinv = inverse_to_scipy(A, sigma)
    elif source == "node":
        node = Node(A)
        opinv = inverse_to_scipy(node, sigma)
    else:
        shifted = A - sigma * torch.eye(60, dtype=DT)
        opinv = inverse_to_scipy(A, sigma, solve=lambda B: torch.linalg.solve(shifted, B))
    w = eigsh(to_scipy(A), k=3, sigma=sigma, OPinv=opinv, return_eigenvectors=False)
    ref = torch.linalg.eigvalsh(A)
    nearest = ref[(ref - sigma).abs().argsort()[:3]].sort().values
    np.testing.assert_allclose(np.sort(w), nearest.numpy(), rtol=1e-8)
    if source == "node":
        assert node.solves > 0


def test_inverse_applies_shifted_inverse_and_transpose():
    A = torch.randn(7, 7, generator=gen(2), dtype=DT) + 5 * torch.eye(7, dtype=DT)
    inv = inverse_to_scipy(A, 0.5)
    Minv = torch.linalg.inv(A - 0.5 * torch.eye(7, dtype=DT)).numpy()
    x = np.linspace(-1, 1, 7)
    np.testing.assert_allclose(inv.matvec(x), Minv @ x, rtol=1e-10)
    np.testing.assert_allclose(inv.rmatvec(x), Minv.T @ x, rtol=1e-10)


def test_scipy_cg_and_minres():
    A = spd(50, seed=3)
    b = torch.randn(50, generator=gen(4), dtype=DT)
    exact = torch.linalg.solve(A, b).numpy()
    x, info = scipy_cg(to_scipy(A, symmetric=True), b.numpy(), rtol=1e-10)
    assert info == 0
    np.testing.assert_allclose(x, exact, rtol=1e-6, atol=1e-8)
    x, info = minres(to_scipy(lambda X: A @ X, shape=(50, 50), dtype=DT), b.numpy(), rtol=1e-12)
    np.testing.assert_allclose(x, exact, rtol=1e-6, atol=1e-8)


def test_lobpcg():
    A = spd(60, seed=5)
    X0 = np.random.default_rng(0).standard_normal((60, 3))
    w, _ = lobpcg(to_scipy(A), X0, largest=True, tol=1e-9, maxiter=500)
    np.testing.assert_allclose(np.sort(w), torch.linalg.eigvalsh(A)[-3:].numpy(), rtol=1e-6)


def test_transpose_sources():
    M = torch.randn(5, 5, generator=gen(6), dtype=DT)
    y = np.ones(5)
    np.testing.assert_allclose(to_scipy(Node(M)).rmatvec(y), M.numpy().T @ y)
    callable_op = to_scipy(lambda X: M @ X, shape=(5, 5), dtype=DT)
    with pytest.raises(UnsupportedError, match="no transpose"):
        callable_op.rmatvec(y)
    S = M + M.T
    sym_op = to_scipy(lambda X: S @ X, shape=(5, 5), dtype=DT, symmetric=True)
    np.testing.assert_allclose(sym_op.rmatvec(y), S.numpy() @ y)


def test_inverse_errors():
    with pytest.raises(SingularError, match="singular"):
        inverse_to_scipy(torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=DT)), sigma=2.0)
    with pytest.raises(UnsupportedError, match="solve="):
        inverse_to_scipy(lambda X: X)
    with pytest.raises(ShapeError, match="square"):
        inverse_to_scipy(torch.ones(3, 4, dtype=DT))
