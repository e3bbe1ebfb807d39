"""``Dense(M) + c·I`` / ``+ diag(d)`` as a :class:`ShiftedDense` that shares ``M``: the generic suite
against the dense twin ``M + shift`` built with plain torch, plus the memory contract (one shifted
copy, factorised in place; no ``n × n`` tensor held besides ``M`` and its factor), cache
invalidation after an in-place change of ``M`` or ``d``, the reuse of ``M``'s cached eigh and the
errors."""

from __future__ import annotations

import pickle

import pytest
import torch

from nngeo_ops.errors import NotPSDError, SingularError
from nngeo_ops.ops import (
    FACTORIZATIONS,
    Compiled,
    CompilePolicy,
    Dense,
    Diagonal,
    Identity,
    ShiftedDense,
)

from .suite import OperatorSuite, close, rnd
from .suite import spd as _spd

F64 = torch.float64


def spd(B):
    return _spd(B, shift=0.1)


def _eye(M):
    return torch.eye(M.shape[0], dtype=M.dtype)


class TestShiftedDensePSDScalar(OperatorSuite):
    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 7, 7)]

    def build(self, p):
        M = spd(p[0])
        return ShiftedDense(Dense(M, psd=True), 0.3), M + 0.3 * _eye(M)


class TestShiftedDensePSDTensorScalar(OperatorSuite):
    """A 0-dim tensor shift (a damping that gradients reach), through the rewrite of the sum."""

    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 6, 6), torch.tensor(0.7, dtype=F64)]

    def build(self, p):
        M = spd(p[0])
        op = (Dense(M, psd=True, name="A") + p[1] * Identity(6)).simplify()
        assert isinstance(op, ShiftedDense) and op.base is M
        return op, M + p[1] * _eye(M)


class TestShiftedDensePSDDiagonal(OperatorSuite):
    symmetric = psd = True

    def params(self, dtype, gen):
        return [rnd(gen, 7, 7), torch.rand(7, generator=gen, dtype=F64) + 0.1]

    def build(self, p):
        M = spd(p[0])
        return ShiftedDense(Dense(M, psd=True), p[1]), M + torch.diag(p[1])


class TestShiftedDenseGeneralDiagonal(OperatorSuite):
    """A non-symmetric M: the LU route, through a transposing column-major copy."""

    def params(self, dtype, gen):
        return [rnd(gen, 6, 6), rnd(gen, 6)]

    def build(self, p):
        M = p[0] + 4 * _eye(p[0])
        return ShiftedDense(Dense(M), p[1]), M + torch.diag(p[1])


class TestShiftedDenseColumnMajor(OperatorSuite):
    """A column-major M (the layout eigh returns), non-symmetric, scalar shift."""

    def params(self, dtype, gen):
        return [rnd(gen, 5, 5)]

    def build(self, p):
        M = (p[0] + 4 * _eye(p[0])).mT  # a column-major view
        return ShiftedDense(Dense(M), -0.5), M - 0.5 * _eye(M)


# ------------------------------------------------------------------------------ rewrite and tags
@pytest.mark.parametrize("shift", ["scalar", "diagonal"])
def test_the_damped_dense_node_shares_m(shift):
    g = torch.Generator().manual_seed(0)
    M = spd(rnd(g, 6, 6))
    A = Dense(M, psd=True)
    s = 0.2 * Identity(6) if shift == "scalar" else Diagonal(torch.rand(6, dtype=F64) + 0.1)
    node = (A + s).simplify()
    assert isinstance(node, ShiftedDense) and node.source is A and node.base is M
    assert node.symmetric and node.psd
    assert [t is M for t in node.leaf_tensors()][0]
    close(node.M, M + s.to_dense())
    # a negative shift keeps symmetry, not PSD
    neg = (A + (-0.2) * Identity(6)).simplify()
    assert neg.symmetric and not neg.psd
    neg_d = (A + Diagonal(torch.tensor([1.0, -1e-3, 1, 1, 1, 1], dtype=F64))).simplify()
    assert neg_d.symmetric and not neg_d.psd


def test_shifts_merge_and_scalars_fold():
    g = torch.Generator().manual_seed(1)
    M = spd(rnd(g, 5, 5))
    d = torch.rand(5, dtype=F64, generator=g)
    A = Dense(M, psd=True)
    twice = (ShiftedDense(A, 0.5) + Diagonal(d)).simplify()
    assert isinstance(twice, ShiftedDense) and twice.base is M
    close(twice.to_dense(), M + 0.5 * _eye(M) + torch.diag(d))
    scaled = (3.0 * ShiftedDense(A, 0.5)).simplify()
    assert isinstance(scaled, ShiftedDense) and scaled.psd
    close(scaled.to_dense(), 3 * (M + 0.5 * _eye(M)))
    b = torch.randn(5, dtype=F64)
    close((3.0 * A + 1.5 * Identity(5)).solve(b), torch.linalg.solve(3 * M + 1.5 * _eye(M), b))


# ------------------------------------------------------------------------------ every route closed-form
@pytest.mark.parametrize("shift", ["scalar", "diagonal"])
@pytest.mark.parametrize("psd", [True, False])
def test_routes_against_torch_with_no_fallback(shift, psd):
    # dense_limit below n and exact=True: a route that densified or estimated would fail here
    g = torch.Generator().manual_seed(2)
    n = 9
    M = spd(rnd(g, n, n)) if psd else rnd(g, n, n) + 3 * torch.eye(n, dtype=F64)
    s = 0.4 if shift == "scalar" else torch.rand(n, dtype=F64, generator=g) + 0.2
    dense = M + (s * _eye(M) if shift == "scalar" else torch.diag(s))
    A = Dense(M, psd=psd, name="F")
    op = A + (s * Identity(n) if shift == "scalar" else Diagonal(s))
    c = Compiled(op, CompilePolicy(dense_limit=2, exact=True))
    assert isinstance(c.simplified, ShiftedDense)
    B = torch.randn(n, 3, dtype=F64, generator=g)
    close(c.solve(B), torch.linalg.solve(dense, B))
    sign, logabs = torch.linalg.slogdet(dense)
    s_, la = c.slogdet()
    assert float(s_) == float(sign)
    close(la, logabs)
    close(c.diag(), dense.diagonal())
    close(c.trace(), dense.trace())
    close(c.frobenius_norm(), torch.linalg.matrix_norm(dense))
    close(c.simplified.inv() @ B, torch.linalg.solve(dense, B))
    if psd:
        E = c.eigh()
        close(E.to_dense(), dense)
        close(torch.sort(E.evals).values, torch.linalg.eigvalsh(dense))
    text = c.explain()
    assert "one shifted copy of M, in place" in text and "(F + " in text
    assert "fallback" not in text and "estimate" not in text


def test_frobenius_by_blocks_of_rows(monkeypatch):
    import nngeo_ops.ops.shifted_dense as sd

    monkeypatch.setattr(sd, "_ROWS_CHUNK", 13)  # 2 rows of 7 at a time, and a last single row
    g = torch.Generator().manual_seed(3)
    M = rnd(g, 7, 7)
    d = -M.diagonal().clone()  # cancels the diagonal exactly: no ‖M‖² − … cancellation
    op = ShiftedDense(Dense(M), d)
    close(op.frobenius_norm(), torch.linalg.matrix_norm(M + torch.diag(d)))


def test_above_the_dense_limit():
    # n = dense_limit + 1: solve, logdet, diag and trace are closed-form at this size too
    n = CompilePolicy().dense_limit + 1
    g = torch.Generator().manual_seed(4)
    R = rnd(g, n, 40)
    M = R @ R.mT / 40  # PSD, rank 40: singular without the shift
    A = Dense(M, psd=True)
    op = A + 0.5 * Identity(n)
    dense = M + 0.5 * _eye(M)
    b = torch.randn(n, dtype=F64, generator=g)
    x = op.solve(b)
    close(dense @ x, b)
    close(op.logdet(), 2 * torch.log(torch.linalg.cholesky(dense).diagonal()).sum())
    close(op.diag(), dense.diagonal())
    close(op.trace(), dense.trace())
    assert "in place" in op.compiled().explain()


# ------------------------------------------------------------------------------ memory
def _big_tensors(obj, n, seen=None):
    """Every n × n tensor storage reachable from ``obj`` through dicts, tuples, lists and node
    attributes (by storage address)."""
    seen = set() if seen is None else seen
    out = set()
    if id(obj) in seen:
        return out
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.numel() >= n * n:
            out.add(obj.untyped_storage().data_ptr())
        return out
    if isinstance(obj, dict):
        items = obj.values()
    elif isinstance(obj, (tuple, list)):
        items = obj
    elif hasattr(obj, "__dict__"):
        items = vars(obj).values()
    else:
        return out
    for v in items:
        out |= _big_tensors(v, n, seen)
    return out


@pytest.mark.parametrize("psd", [True, False])
def test_the_damped_node_holds_m_and_one_factor_only(psd):
    g = torch.Generator().manual_seed(5)
    n = 40
    M = spd(rnd(g, n, n)) if psd else rnd(g, n, n) + 5 * torch.eye(n, dtype=F64)
    A = Dense(M, psd=psd)
    damped = A + 1e-3 * Identity(n)
    damped.solve(torch.ones(n, dtype=F64))
    damped.logdet() if psd else damped.slogdet()
    node = damped.compiled().simplified
    assert isinstance(node, ShiftedDense)
    kinds = node.__dict__["_factors"]
    assert list(kinds) == (["cholesky"] if psd else ["lu"])
    factor = kinds["cholesky"][1] if psd else kinds["lu"][1][0]
    # the factor is the shifted copy itself (factorised in place), column-major for LAPACK
    assert factor.stride() == (1, n)
    held = _big_tensors(damped, n)
    assert held == {M.untyped_storage().data_ptr(), factor.untyped_storage().data_ptr()}
    assert factor.untyped_storage().nbytes() == n * n * factor.element_size()


# ------------------------------------------------------------------------------ caches
@pytest.mark.parametrize("psd", [True, False])
def test_in_place_change_of_m_gives_a_fresh_factor(psd):
    g = torch.Generator().manual_seed(6)
    n = 8
    M = spd(rnd(g, n, n)) if psd else rnd(g, n, n) + 4 * torch.eye(n, dtype=F64)
    damped = Dense(M, psd=psd) + 0.3 * Identity(n)
    b = torch.randn(n, dtype=F64, generator=g)
    close(damped.solve(b), torch.linalg.solve(M + 0.3 * _eye(M), b))
    before = dict(FACTORIZATIONS)
    damped.solve(b)
    assert dict(FACTORIZATIONS) == before
    M.mul_(2.0).add_(0.1 * torch.eye(n, dtype=F64))
    close(damped.solve(b), torch.linalg.solve(M + 0.3 * _eye(M), b))
    close(
        damped.logdet() if psd else damped.slogdet()[1], torch.linalg.slogdet(M + 0.3 * _eye(M))[1]
    )
    # the node held by the compiled form is the one refactorised (directly, not through the sum)
    node = ShiftedDense(Dense(M, psd=psd), 0.3)
    node.solve(b)
    M.diagonal().add_(1.0)
    close(node.solve(b), torch.linalg.solve(M + 0.3 * _eye(M), b))


def test_in_place_change_of_the_diagonal_shift_gives_a_fresh_factor():
    g = torch.Generator().manual_seed(7)
    M = spd(rnd(g, 6, 6))
    d = torch.rand(6, dtype=F64, generator=g) + 0.1
    node = ShiftedDense(Dense(M, psd=True), d)
    b = torch.randn(6, dtype=F64, generator=g)
    close(node.solve(b), torch.linalg.solve(M + torch.diag(d), b))
    d.mul_(3.0)
    close(node.solve(b), torch.linalg.solve(M + torch.diag(d), b))
    close(node.diag(), M.diagonal() + d)


def test_eigh_reuses_the_cached_eigh_of_m_for_a_scalar_shift():
    g = torch.Generator().manual_seed(8)
    M = spd(rnd(g, 7, 7))
    A = Dense(M, psd=True)
    EA = A.eigh()
    before = FACTORIZATIONS["eigh"]
    E = (A + 0.25 * Identity(7)).eigh()
    assert FACTORIZATIONS["eigh"] == before + 1  # the shifted node's own entry, no new eigh of M
    assert E.Q.M is EA.Q.M  # the same basis
    close(E.to_dense(), M + 0.25 * _eye(M))
    # a diagonal shift: its own eigendecomposition (of a shifted copy)
    d = torch.rand(7, dtype=F64, generator=g)
    Ed = (A + Diagonal(d)).eigh()
    close(Ed.to_dense(), M + torch.diag(d))


# ------------------------------------------------------------------------------ precisions, pickling
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precisions(dtype):
    g = torch.Generator().manual_seed(9)
    M64 = spd(rnd(g, 10, 10))
    M = M64.to(dtype)
    damped = Dense(M, psd=True) + 0.5 * Identity(10)
    node = damped.simplify()
    assert isinstance(node, ShiftedDense) and node.dtype == dtype
    assert node.cholesky_factor().dtype == torch.float32  # factor_dtype
    b = torch.randn(10, dtype=F64, generator=g)
    ref = torch.linalg.solve(M.double() + 0.5 * _eye(M64), b)
    tol = 2e-3 if dtype == torch.float32 else 5e-2
    x = damped.solve(b.to(dtype)).double()
    assert float((x - ref).norm() / ref.norm()) < tol


def test_to_and_pickle():
    g = torch.Generator().manual_seed(10)
    M = spd(rnd(g, 6, 6))
    d = torch.rand(6, dtype=F64, generator=g)
    node = ShiftedDense(Dense(M, psd=True, name="A"), d)
    b = torch.randn(6, dtype=F64, generator=g)
    node.solve(b)
    node32 = node.to(torch.float32)
    assert isinstance(node32, ShiftedDense) and node32.psd and node32.shift.dtype == torch.float32
    close(node32.to_dense(), (M + torch.diag(d)).float(), torch.float32)
    back = pickle.loads(pickle.dumps(node))
    assert "_factors" not in back.__dict__
    close(back.solve(b), torch.linalg.solve(M + torch.diag(d), b))
    assert str(node) == "(A + diag)" and str(ShiftedDense(node.source, 0.5)) == "(A + 0.5·I)"


# ------------------------------------------------------------------------------ errors
def test_not_positive_definite_raises_with_its_message():
    # tagged PSD (symmetric, so the tag check passes) but with eigenvalue −1: a small shift leaves it
    # indefinite and the Cholesky of the shifted copy fails
    g = torch.Generator().manual_seed(11)
    Q = torch.linalg.qr(rnd(g, 5, 5))[0]
    M = Q @ torch.diag(torch.tensor([-1.0, 1, 2, 3, 4], dtype=F64)) @ Q.mT
    M = (M + M.mT) / 2
    damped = Dense(M, psd=True, name="F") + 0.1 * Identity(5)
    with pytest.raises(NotPSDError, match=r"Cholesky of \(F \+ 0\.1·I\).*not positive definite"):
        damped.solve(torch.ones(5, dtype=F64))
    with pytest.raises(NotPSDError, match="damping"):
        damped.logdet()
    with pytest.raises(NotPSDError, match="was tagged psd=True"):
        damped.eigh()
    # enough damping: fine
    ok = Dense(M, psd=True) + 1.5 * Identity(5)
    close(
        ok.solve(torch.ones(5, dtype=F64)),
        torch.linalg.solve(M + 1.5 * _eye(M), torch.ones(5, dtype=F64)),
    )


def test_singular_shifted_matrix_raises():
    M = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=F64))
    M[0, 1] = 0.5  # not symmetric: the LU route
    with pytest.raises(SingularError, match="singular"):
        (Dense(M) + Diagonal(torch.tensor([-1.0, 0.0, 0.0], dtype=F64))).solve(
            torch.ones(3, dtype=F64)
        )


def test_bad_shift_and_base():
    from nngeo_ops.errors import ArgumentTypeError, NonFiniteError, ShapeError

    M = torch.eye(3, dtype=F64)
    with pytest.raises(ArgumentTypeError, match="length 3"):
        ShiftedDense(Dense(M), torch.ones(4, dtype=F64))
    with pytest.raises(ShapeError, match="square"):
        ShiftedDense(Dense(torch.ones(3, 2, dtype=F64)), 1.0)
    with pytest.raises(NonFiniteError):
        ShiftedDense(Dense(M), float("nan"))
    with pytest.raises(ArgumentTypeError, match="Dense"):
        ShiftedDense(M, 1.0)
