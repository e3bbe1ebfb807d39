"""as_matmat: the normalisation every linalg algorithm goes through."""

import pytest
import torch

from nngeo_ops.errors import DTypeDeviceError, NNGeoError, ShapeError, UnsupportedError
from nngeo_ops.linalg import MatmatOperator, as_matmat, hutchinson

DT = torch.float64


class Node:
    """A duck-typed stand-in for the library's lazy nodes (shape/dtype/device/@, optional .T)."""

    def __init__(self, M):
        self.M = M
        self.shape = tuple(M.shape)
        self.dtype = M.dtype
        self.device = M.device

    def __matmul__(self, X):
        return self.M @ X


class NodeT(Node):
    @property
    def T(self):
        return NodeT(self.M.mT)


def rand(*shape, seed=0, dtype=DT):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_tensor_operator_products_and_transpose():
    M = rand(5, 3)
    op = as_matmat(M)
    X, Y = rand(3, 2, seed=1), rand(5, 4, seed=2)
    assert op.shape == (5, 3) and op.dtype == DT
    torch.testing.assert_close(op.matmat(X), M @ X)
    torch.testing.assert_close(op.rmatmat(Y), M.T @ Y)
    torch.testing.assert_close(op.matvec(X[:, 0]), M @ X[:, 0])
    torch.testing.assert_close(op.T.matmat(Y), M.T @ Y)


def test_tensor_dtype_conversion_on_request():
    op = as_matmat(rand(3, 3), dtype=torch.float32)
    assert op.dtype == torch.float32
    assert op.matmat(torch.ones(3, 1)).dtype == torch.float32


def test_object_operator_uses_matmul_and_T():
    M = rand(4, 6)
    op = as_matmat(NodeT(M))
    assert op.shape == (4, 6) and op.description == "NodeT"
    torch.testing.assert_close(op.matmat(rand(6, 2, seed=3)), M @ rand(6, 2, seed=3))
    torch.testing.assert_close(op.rmatmat(rand(4, 2, seed=4)), M.T @ rand(4, 2, seed=4))


def test_object_without_T_has_no_transpose():
    op = as_matmat(Node(rand(4, 4)))
    with pytest.raises(UnsupportedError, match="no transpose"):
        op.rmatmat(torch.ones(4, 1, dtype=DT))
    sym = as_matmat(Node(rand(4, 4)), symmetric=True)
    torch.testing.assert_close(
        sym.rmatmat(torch.ones(4, 1, dtype=DT)), sym.matmat(torch.ones(4, 1, dtype=DT))
    )


def test_callable_operator_defaults_and_shape_required():
    M = rand(3, 3)
    op = as_matmat(lambda X: M @ X, shape=(3, 3), dtype=DT)
    torch.testing.assert_close(op.matmat(torch.eye(3, dtype=DT)), M)
    default = as_matmat(lambda X: X, shape=(2, 2))
    assert default.dtype == torch.get_default_dtype()
    with pytest.raises(ShapeError, match="needs its shape"):
        as_matmat(lambda X: X)


def test_operator_is_idempotent():
    op = as_matmat(rand(3, 3))
    assert as_matmat(op) is op
    assert as_matmat(op, symmetric=True).symmetric


def test_callable_with_wrong_output_shape_is_reported():
    op = as_matmat(lambda X: X[:2], shape=(3, 3), dtype=DT)
    with pytest.raises(ShapeError, match=r"returned shape \(2, 1\).*expected \(3, 1\)"):
        op.matmat(torch.ones(3, 1, dtype=DT))


def test_callable_returning_other_dtype_is_reported():
    op = as_matmat(lambda X: X.float(), shape=(3, 3), dtype=DT)
    with pytest.raises(DTypeDeviceError, match="pass dtype="):
        op.matmat(torch.ones(3, 1, dtype=DT))


def test_bad_inputs_raise_library_errors():
    with pytest.raises(ShapeError, match=r"2-D matrix, got shape \(2, 2, 2\)"):
        as_matmat(torch.ones(2, 2, 2))
    with pytest.raises(DTypeDeviceError, match="floating dtype"):
        as_matmat(torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(DTypeDeviceError, match="cannot use a list"):
        as_matmat([[1.0]])
    with pytest.raises(ShapeError, match="disagrees"):
        as_matmat(rand(3, 3), shape=(2, 2))
    op = as_matmat(rand(3, 3))
    with pytest.raises(ShapeError, match=r"needs an \(3, k\) matrix, got shape \(4, 1\)"):
        op.matmat(torch.ones(4, 1, dtype=DT))
    with pytest.raises(DTypeDeviceError, match=r"convert it with \.to"):
        op.matmat(torch.ones(3, 1, dtype=torch.float32))


def test_errors_are_catchable_as_builtins():
    with pytest.raises(ValueError):
        as_matmat(torch.ones(2))
    with pytest.raises(NNGeoError):
        as_matmat(torch.ones(2))


def test_square_needed_error_names_shape():
    with pytest.raises(ShapeError, match=r"square operator.*\(3, 4\)"):
        hutchinson(rand(3, 4), 2)


def test_record_type():
    assert isinstance(as_matmat(rand(2, 2)), MatmatOperator)


def test_as_operator_is_a_deprecated_alias_of_as_matmat():
    import nngeo_ops.linalg as la

    M = rand(3, 3)
    with pytest.warns(DeprecationWarning, match="as_matmat"):
        op = la.as_operator(M, symmetric=True)
    ref = as_matmat(M, symmetric=True)
    assert isinstance(op, MatmatOperator) and op.shape == ref.shape and op.symmetric
    X = rand(3, 2)
    torch.testing.assert_close(op.matmat(X), M @ X)
    with pytest.warns(DeprecationWarning):
        with pytest.raises(ShapeError):
            la.as_operator(lambda X: X)  # same errors as as_matmat
