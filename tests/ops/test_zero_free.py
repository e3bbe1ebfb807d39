"""The one-pass range check of diagonals and spectra (finiteness, PSD tag, invertibility) and its
reuse by solves and inverses: a zero entry is still refused after an in-place or ``.data`` change."""

import pytest
import torch

from nngeo_ops.errors import NonFiniteError, SingularError
from nngeo_ops.ops import Dense, Diagonal, Eigen, Identity
from nngeo_ops.ops.leaf_checks import finite_range


def test_finite_range_of_every_kind_of_tensor():
    assert finite_range(torch.tensor([3.0, -1.0, 2.0]), "x") == (-1.0, 3.0)
    assert finite_range(torch.tensor([4, 7]), "x") == (4.0, 7.0)
    assert finite_range(torch.tensor([True, False]), "x") == (0.0, 1.0)
    assert finite_range(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), "x") == (1.0, 2.0)
    lo, hi = finite_range(torch.tensor([]), "x")
    assert lo > hi  # empty: (inf, -inf)
    for bad in (float("nan"), float("inf"), -float("inf")):
        with pytest.raises(NonFiniteError, match="leaf x"):
            finite_range(torch.tensor([1.0, bad, 2.0]), "leaf x")
    with pytest.raises(NonFiniteError):
        finite_range(torch.tensor([1 + 1j, complex(float("nan"), 0)]), "x")


def test_tags_and_zero_freedom_from_the_range():
    assert Diagonal(torch.tensor([1.0, 2.0])).psd
    assert Diagonal(torch.tensor([1.0, 2.0])).excludes_zero
    assert Diagonal(torch.tensor([-1.0, -2.0])).excludes_zero
    assert not Diagonal(torch.tensor([-1.0, 2.0])).psd
    assert not Diagonal(torch.tensor([-1.0, 2.0])).excludes_zero  # unknown: the range holds 0
    assert not Diagonal(torch.tensor([0.0, 2.0])).excludes_zero
    q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    assert Eigen(q, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)).excludes_zero
    assert not Eigen(q, torch.tensor([0.0, 2.0, 3.0], dtype=torch.float64)).excludes_zero


def test_mixed_signs_without_zero_solve_exactly():
    d = torch.tensor([-2.0, 0.5, 3.0], dtype=torch.float64)
    b = torch.randn(3, dtype=torch.float64)
    torch.testing.assert_close(Diagonal(d).solve(b), b / d)
    with pytest.raises(SingularError):
        Diagonal(torch.tensor([-2.0, 0.0, 3.0])).solve(torch.ones(3))


@pytest.mark.parametrize("how", ["in place", "data"])
def test_a_zero_written_after_the_build_is_still_refused(how):
    d = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    D = Diagonal(d)
    b = torch.ones(3, dtype=torch.float64)
    torch.testing.assert_close(D.solve(b), b / d)
    if how == "in place":
        d[1] = 0.0
    else:
        d.data[1] = 0.0  # moves no version counter: seen by the checksum
    assert not D.excludes_zero
    with pytest.raises(SingularError):
        D.solve(b)
    with pytest.raises(SingularError):
        D.inv().simplify()


def test_eigen_zero_written_after_the_build_is_refused():
    q = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0]
    ev = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    E = Eigen(q, ev)
    b = torch.randn(3, dtype=torch.float64)
    dense = q @ torch.diag(ev) @ q.T
    torch.testing.assert_close(E.solve(b), torch.linalg.solve(dense, b))
    ev[0] = 0.0
    with pytest.raises(SingularError):
        E.solve(b)


def test_damped_diagonal_folds_to_the_shifted_diagonal():
    d = torch.rand(500, dtype=torch.float64)
    b = torch.randn(500, dtype=torch.float64)
    A = Diagonal(d) + 1e-3 * Identity(500) + Diagonal(d) + 0.5 * Identity(500)
    S = A.simplify()
    assert isinstance(S, Diagonal) and S.excludes_zero
    torch.testing.assert_close(S.d, 2 * d + 0.501)
    torch.testing.assert_close(A.solve(b), b / (2 * d + 0.501))
    dense = Dense(torch.diag(2 * d) + 0.501 * torch.eye(500, dtype=torch.float64), psd=True)
    torch.testing.assert_close(A.solve(b), dense.solve(b))


def test_large_leaf_checksum_sees_a_rescaling_a_sampled_block_and_the_last_entry():
    """Above CHECKSUM_ENTRIES the checksum samples contiguous blocks (and the last entry): a
    ``.data`` rescaling, a write into a sampled block, and one to the tail are all seen."""
    from nngeo_ops.ops.leaf_checks import CHECKSUM_BLOCK, CHECKSUM_ENTRIES, _checksum

    n = 3 * CHECKSUM_ENTRIES + 17  # a tail past the last whole block
    d = torch.rand(n, dtype=torch.float64) + 0.5
    base = _checksum(d)
    assert _checksum(d) == base
    d.data.mul_(2.0)
    assert _checksum(d) != base
    d.data.div_(2.0)
    base = _checksum(d)
    d.data[CHECKSUM_BLOCK - 1] += 1.0  # inside the first block, which is always sampled
    assert _checksum(d) != base
    base = _checksum(d)
    d.data[-1] = 0.0
    assert _checksum(d) != base


def test_a_damped_large_diagonal_still_refuses_a_zero_written_in_place():
    """The folded ``d + c`` is keyed on its version counter alone (ops made it); the caller's
    leaf keeps its checksum: a ``.data`` write of ``-c`` into a sampled entry is seen."""
    n = 100_000
    d = torch.rand(n, dtype=torch.float64) + 0.5
    b = torch.randn(n, dtype=torch.float64)
    A = Diagonal(d) + 0.25 * Identity(n)
    torch.testing.assert_close(A.solve(b), b / (d + 0.25))
    S = A.simplify()
    assert S.excludes_zero
    S.d[3] = 0.0  # in place on the derived tensor: the version counter moves
    assert not S.excludes_zero
    with pytest.raises(SingularError):
        S.solve(b)
    d.data[0] = -0.25  # through .data on the caller's leaf, in a sampled block
    with pytest.raises(SingularError):
        A.solve(b)


def test_large_leaf_checksum_of_views_reads_the_view_only():
    """A sampled leaf that is a view (a storage offset, or non-contiguous) is checksummed over its
    own entries: equal views of different storage agree, and a write outside the view is not seen
    while one at either end of it is."""
    from nngeo_ops.ops.leaf_checks import CHECKSUM_ENTRIES, _checksum

    n = 2 * CHECKSUM_ENTRIES + 5
    base = torch.rand(n + 300, dtype=torch.float64)
    view = base[100 : 100 + n]  # a storage offset
    copy = view.clone()
    assert _checksum(view) == _checksum(copy)
    before = _checksum(view)
    base.data[:100] += 1.0  # outside the view
    assert _checksum(view) == before
    base.data[100] += 1.0  # the view's first entry
    assert _checksum(view) != before
    before = _checksum(view)
    base.data[99 + n] += 1.0  # its last entry
    assert _checksum(view) != before
    # non-contiguous: the transpose of a matrix, checksummed as its row-major copy
    m = torch.rand(300, 500, dtype=torch.float64).T
    assert _checksum(m) == _checksum(m.contiguous())
    before = _checksum(m)
    m.data[-1, -1] += 1.0
    assert _checksum(m) != before
