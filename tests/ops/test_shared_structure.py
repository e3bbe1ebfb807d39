"""Structure built once and shared: AppendColumn index vectors per layer shape, a permutation's
transpose node, and the two-dense-factor Kronecker product (A ⊗ B) vec X = vec(A X Bᵀ); each
checked against the dense matrix."""

import pytest
import torch

from nngeo_ops.ops import AppendColumn, Dense, Diagonal, Kronecker, Permutation


def _explicit_append_column(rows, cols):
    perm = []
    for o in range(rows):
        perm += [o * cols + i for i in range(cols)] + [rows * cols + o]
    return torch.tensor(perm)


@pytest.mark.parametrize("rows,cols", [(3, 4), (1, 5), (4, 0), (2, 1)])
def test_append_column_is_the_explicit_permutation(rows, cols):
    P = AppendColumn(rows, cols, dtype=torch.float64)
    ref = Permutation(_explicit_append_column(rows, cols), dtype=torch.float64)
    torch.testing.assert_close(P.to_dense(), ref.to_dense())
    assert P.symmetric == ref.symmetric
    x = torch.randn(P.shape[0], 2, dtype=torch.float64)
    torch.testing.assert_close(P.T.simplify().matvec(x), ref.to_dense().T @ x)
    torch.testing.assert_close(P.transpose().matvec(x), ref.to_dense().T @ x)


def test_transpose_is_built_once_and_index_vectors_are_shared():
    P = AppendColumn(5, 7, dtype=torch.float64)
    assert P.transpose() is P.transpose()
    assert P.transpose().transpose() is P
    Q = AppendColumn(5, 7, dtype=torch.float64)
    assert Q.perm is P.perm and Q.fingerprint() == P.fingerprint()
    G = Permutation(torch.tensor([2, 0, 1]), dtype=torch.float64)
    assert G.transpose() is G.transpose() and G.transpose().transpose() is G
    torch.testing.assert_close(G.transpose().to_dense(), G.to_dense().T)


def test_a_bad_permutation_is_still_refused():
    from nngeo_ops.errors import InvalidArgumentError

    with pytest.raises(InvalidArgumentError):
        Permutation(torch.tensor([0, 0, 1]))


@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("k", [1, 3])
def test_two_dense_kronecker_products(layout, k):
    torch.manual_seed(0)
    A = torch.randn(4, 3, dtype=torch.float64)
    B = torch.randn(5, 6, dtype=torch.float64)
    if layout == "col":
        A, B = A.mT.contiguous().mT, B.mT.contiguous().mT
    K = Kronecker(Dense(A), Dense(B))
    dense = torch.kron(A, B)
    X = torch.randn(18, k, dtype=torch.float64)
    Y = torch.randn(20, k, dtype=torch.float64)
    torch.testing.assert_close(K.matvec(X), dense @ X)
    torch.testing.assert_close(K.rmatvec(Y), dense.T @ Y)
    torch.testing.assert_close(K.matvec(X[:, 0]), dense @ X[:, 0])
    torch.testing.assert_close(K.rmatvec(Y[:, 0]), dense.T @ Y[:, 0])
    torch.testing.assert_close(
        (K @ Diagonal(torch.ones(18, dtype=torch.float64))).to_dense(), dense
    )


def test_two_factor_kronecker_vectors_with_structured_factors():
    from nngeo_ops.ops import LowRank

    torch.manual_seed(1)
    U = torch.randn(7, 2, dtype=torch.float64)
    d = torch.rand(4, dtype=torch.float64) + 0.5
    M = torch.randn(3, 5, dtype=torch.float64)
    cases = [
        (Dense(M), LowRank(U)),
        (LowRank(U), Diagonal(d)),
        (Diagonal(d), Dense(M.mT.contiguous().mT)),
        (Kronecker(Diagonal(d), Dense(M)), Dense(M)),
    ]
    for a, b in cases:
        K = Kronecker(a, b)
        dense = torch.kron(a.to_dense().contiguous(), b.to_dense().contiguous())
        x = torch.randn(K.shape[1], dtype=torch.float64)
        y = torch.randn(K.shape[0], dtype=torch.float64)
        torch.testing.assert_close(K.matvec(x), dense @ x)
        torch.testing.assert_close(K.rmatvec(y), dense.T @ y)
        torch.testing.assert_close(K.matvec(x[:, None]), dense @ x[:, None])
