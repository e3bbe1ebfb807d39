"""The first damped solve of a diagonal: ``Diagonal(d) + c·I`` folds into one diagonal whose range
comes from the range of ``d`` known since its node was built (shifted exactly at its two ends)
instead of a reduction over ``d + c``, and the compilation reads the leaf's checksum from the
fingerprint its cache key already holds. Checked against dense ``torch.linalg.solve`` (float64,
below and above ``CompilePolicy.dense_limit``), against a fresh ``torch.aminmax`` for the range,
and for stale ranges."""

import pytest
import torch

import nngeo_ops.ops.leaf_checks as base
from nngeo_ops.errors import NonFiniteError, SingularError
from nngeo_ops.ops import Compiled, CompilePolicy, Diagonal, Identity, ScaledIdentity

F64 = torch.float64
LIMIT = CompilePolicy().dense_limit


def _fresh_range(t):
    """The range by torch's own reduction (the ground truth)."""
    lo, hi = torch.aminmax(t)
    assert bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))
    return float(lo), float(hi)


def _node_range(S):
    return S._range.lo, S._range.hi


@pytest.mark.parametrize("n", [7, LIMIT - 1, LIMIT + 1])
@pytest.mark.parametrize("lam", [1e-3, 0.5])
def test_damped_diagonal_solve_matches_dense(n, lam):
    g = torch.Generator().manual_seed(n)
    d = torch.rand(n, generator=g, dtype=F64)
    d[::5] = 0.0  # a Fisher diagonal has zeros (dead units): singular without the damping
    b = torch.randn(n, generator=g, dtype=F64)
    A = Diagonal(d) + lam * Identity(n)
    x = A.solve(b)
    dense = torch.diag(d) + lam * torch.eye(n, dtype=F64)
    torch.testing.assert_close(x, torch.linalg.solve(dense, b), rtol=1e-12, atol=1e-12)
    B = torch.randn(n, 3, generator=g, dtype=F64)
    torch.testing.assert_close(A.solve(B), torch.linalg.solve(dense, B), rtol=1e-12, atol=1e-12)
    S = A.simplify()
    assert isinstance(S, Diagonal) and S.psd and S.excludes_zero
    assert _node_range(S) == _fresh_range(S.d)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
def test_shifted_ranges_equal_a_fresh_reduction(dtype):
    """A monotone map sends the extremes to the extremes, rounding included: for every dtype, wide
    and tiny magnitudes (subnormals), zeros, negative shifts, shifts that round away entirely or
    cancel an entry to 0, and a tensor shift."""
    g = torch.Generator().manual_seed(0)
    tiny = torch.finfo(dtype).tiny
    for trial in range(40):
        scale = 10.0 ** torch.randint(-6, 4, (1,), generator=g).item()
        d = ((torch.rand(997, generator=g, dtype=F64) - 0.3) * scale).to(dtype)
        d[trial % 997] = tiny / 4  # a subnormal (0 in the half precisions' rounding)
        d[(trial + 1) % 997] = 0.0
        D = Diagonal(d)
        shifts = (1e-3, -1e-3, 0.0, -0.0, 3.0, 1e-9, -float(d.min()), -float(d.max()))
        for c in shifts + (torch.tensor(0.25, dtype=dtype), torch.tensor(-1e-3, dtype=F64)):
            e = d + c
            if not bool(torch.isfinite(e).all()):  # an overflow (float16): refused as before
                with pytest.raises(NonFiniteError):
                    D.shifted(c)
                continue
            S = D.shifted(c)
            assert S.d.dtype == e.dtype
            torch.testing.assert_close(S.d, e, rtol=0, atol=0)
            assert _node_range(S) == _fresh_range(S.d), (dtype, trial, c)
            assert S.psd == bool((S.d >= 0).all()), (dtype, trial, c)
            # known zero-free exactly when the entries have one sign (False: unknown)
            assert S.excludes_zero == (bool((S.d > 0).all()) or bool((S.d < 0).all()))
            assert S.name == "diag"


def test_float32_rounding_of_the_ends():
    """float32 ends where the float64 sum differs from the float32 one (the damping is not a float32
    number, a tie, a damping below half an ulp of the entries, a cancellation to 0)."""
    cases = [
        ([1.0, 2.0], 2.0**-24 + 2.0**-50),  # a tie broken only by the damping's low bits
        ([1.0, 3.0], 2.0**-24),  # an exact tie: to even
        ([1.0, 3.0], 1e-3),
        ([1e8, 3e8], 1.0),  # below half an ulp: rounds away
        ([-1e-3, 5.0], 1e-3),  # cancels to a tiny residue (1e-3 is not a float32)
        ([0.0, 0.0], 1e-3),
        ([-2.5, -1.0], 1e-3),
    ]
    for entries, c in cases:
        d = torch.tensor(entries, dtype=torch.float32)
        S = Diagonal(d).shifted(c)
        assert _node_range(S) == _fresh_range(d + c), (entries, c)


def test_an_overflow_or_a_non_finite_shift_is_refused_as_before():
    d = torch.tensor([1.0, 3.0e38], dtype=torch.float32)
    with pytest.raises(NonFiniteError):
        (Diagonal(d) + 1.0e38 * Identity(2)).solve(torch.ones(2))
    with pytest.raises(NonFiniteError):
        Diagonal(torch.tensor([0.0, 1.0])).shifted(torch.tensor(float("inf")))


@pytest.mark.parametrize("how", ["in place", "data", "nan"])
def test_a_range_gone_stale_is_not_used(how):
    """A change of ``d`` after its node was built (an in-place operation, a ``.data`` write seen by
    the checksum) makes the fold reduce ``d + c`` afresh: a zero the damping cancels is still
    refused, a NaN still raises."""
    n = 500
    d = torch.rand(n, dtype=F64) + 1.0
    D = Diagonal(d)
    lam = 0.25
    if how == "in place":
        d[3] = -lam
    elif how == "data":
        d.data[3] = -lam
    else:
        d.data[3] = float("nan")
    A = D + lam * Identity(n)
    assert D.known_range() is None
    if how == "nan":
        with pytest.raises(NonFiniteError):
            A.solve(torch.ones(n, dtype=F64))
        return
    S = A.simplify()
    assert _node_range(S) == _fresh_range(S.d) and not S.excludes_zero
    with pytest.raises(SingularError):
        A.solve(torch.ones(n, dtype=F64))


def test_explain_names_the_fold_and_the_division():
    n = 100
    d = torch.rand(n, dtype=F64)
    A = Diagonal(d) + 1e-3 * Identity(n)
    A.solve(torch.ones(n, dtype=F64))
    text = A.compiled().explain()
    assert "expression: diag+0.001·I" in text
    assert "[canonical sum] diag+0.001·I  →  diag" in text
    assert "solve     diag  ⇒  elementwise division" in text


def test_second_solve_hits_the_cache_and_a_change_of_d_misses_it():
    n = 100
    d = torch.rand(n, dtype=F64)
    b = torch.randn(n, dtype=F64)
    A = Diagonal(d) + 1e-3 * Identity(n)
    x1 = A.solve(b)
    c = A.compiled()
    x2 = A.solve(b)
    assert A.compiled() is c and len(c.rewrites) == 1 and len(c.routines) == 1
    torch.testing.assert_close(x1, x2, rtol=0, atol=0)
    d.data.mul_(2.0)  # through .data: seen by the checksum of the fingerprint
    assert A.compiled() is not c
    torch.testing.assert_close(A.solve(b), b / (d + 1e-3), rtol=0, atol=0)


def test_the_first_solve_checksums_the_leaf_once(monkeypatch):
    """The fold reads the checksum of ``d`` from the fingerprint of the cache key (computed in the
    same call) instead of a second one; a fingerprint with another checksum is not trusted."""
    calls = []
    real = base._checksum

    def counting(t):
        calls.append(t.shape)
        return real(t)

    n = 100_000  # a sampled checksum
    d = torch.rand(n, dtype=F64)
    D = Diagonal(d)
    for mod in (
        "nngeo_ops.ops.base",
        "nngeo_ops.ops.compile",
        "nngeo_ops.ops.diagonal",
        "nngeo_ops.ops.leaf_checks",
    ):
        monkeypatch.setattr(f"{mod}._checksum", counting)
    A = D + 1e-3 * Identity(n)
    A.solve(torch.ones(n, dtype=F64))
    assert len(calls) == 1
    assert A.compiled().simplified._range.key[2] is None  # derived: no checksum of d + c
    fp = A.fingerprint()
    calls.clear()
    c = Compiled(A, fingerprint=((fp[0][0], fp[0][1], fp[0][2] + 1.0),))  # not d's checksum
    assert _node_range(c.simplified) == _fresh_range(d + 1e-3)
    assert len(calls) == 0  # the fingerprint's checksum was read, found different: no reuse


def test_checksum_of_the_compilation_is_dropped_after_rewriting():
    d = torch.rand(10, dtype=F64)
    A = Diagonal(d) + 1e-3 * Identity(10)
    c = Compiled(A, fingerprint=A.fingerprint())
    d.data[0] = 5.0
    assert c.checksum(d) == base._checksum(d)  # computed afresh once the rewrite is over


def test_scaled_identity_terms_and_tensor_shifts_fold_exactly():
    n = 300
    d = torch.rand(n, dtype=F64)
    lam = torch.tensor(0.125, dtype=F64, requires_grad=True)
    A = Diagonal(d) + ScaledIdentity(lam, n) + 1e-3 * Identity(n)
    b = torch.randn(n, dtype=F64)
    x = A.solve(b)
    torch.testing.assert_close(x, b / (d + 0.126), rtol=1e-14, atol=0)
    x.sum().backward()  # gradients flow through the shift
    torch.testing.assert_close(lam.grad, -(b / (d + 0.126) ** 2).sum(), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ends_computed_in_python_equal_torch_elementwise(dtype):
    """The Python arithmetic for the ends of a float shift of a CPU float32 / float64 diagonal
    equals torch's own ``t + c`` entry by entry: wide exponents, shifts with more bits than
    float32 (the double rounding), ties, and the subnormal / overflow cases it hands to torch."""
    from nngeo_ops.ops.diagonal import _shift_ends

    g = torch.Generator().manual_seed(3)
    n = 4000
    mant = torch.rand(n, generator=g, dtype=F64) + 0.5
    expo = torch.randint(-40, 40, (n,), generator=g).to(F64)
    sign = torch.where(torch.rand(n, generator=g) < 0.3, -1.0, 1.0).to(F64)
    x = (sign * mant * 2.0**expo).to(dtype)
    cs = (torch.rand(n, generator=g, dtype=F64) + 0.5) * 2.0 ** torch.randint(-40, 40, (n,))
    cs = torch.where(torch.rand(n, generator=g) < 0.3, -cs, cs)
    fin = torch.finfo(dtype)
    special = [
        (1.0, 2.0, 2.0**-24 + 2.0**-50),  # a float32 tie broken only by the scalar's low bits
        (1.0, 3.0, 2.0**-24),  # an exact tie: to even
        (-1e-3, 5.0, 1e-3),  # cancels to 0 (float64) or a tiny residue (float32)
        (fin.tiny / 4, 1.0, 1e-3),  # a subnormal end: torch computes it
        (1.0, 2.0, fin.tiny / 4),  # a subnormal shift
        (-fin.tiny, 1.0, fin.tiny * 0.75),  # a subnormal result
        (1.0, 0.5 * fin.max, 0.75 * fin.max),  # overflow: None
        (1.0, 2.0, 1e300),  # beyond float32 (OverflowError in the rounding)
        (1.0, 2.0, -0.0),
        (0.0, 0.0, 0.0),
    ]
    pairs = [(float(x[i]), float(x[(i + 1) % n]), float(cs[i])) for i in range(0, n, 2)]
    for a, b, c in pairs + special:
        t = torch.tensor([min(a, b), max(a, b)], dtype=dtype)
        lo, hi = t.tolist()  # entries of the dtype
        want = t + c
        got = _shift_ends(c, (lo, hi), t, dtype)
        if not bool(torch.isfinite(want).all()):
            assert got is None, (lo, hi, c)
        else:
            assert got == tuple(want.tolist()), (lo, hi, c, got, want.tolist())


@pytest.mark.parametrize("n", [1000, base.CHECKSUM_ENTRIES + 1, 3 * base.CHECKSUM_ENTRIES + 17])
def test_checksum_is_the_weighted_sum_of_its_sample_and_records_no_graph(n):
    """The checksum against the weighted sum over the entries it samples, written out (whole up to
    CHECKSUM_ENTRIES; 64 blocks from entry 0 to the last entry beyond); a leaf that requires grad
    gives the same value and no graph, under grad mode."""
    g = torch.Generator().manual_seed(n)
    t = torch.rand(n, generator=g, dtype=F64)
    if n <= base.CHECKSUM_ENTRIES:
        idx = torch.arange(n)
    else:
        rows, step = base.CHECKSUM_ROWS, (n - base.CHECKSUM_BLOCK) // (base.CHECKSUM_ROWS - 1)
        b = n - (rows - 1) * step
        idx = (torch.arange(rows)[:, None] * step + torch.arange(b)[None, :]).reshape(-1)
        assert int(idx[0]) == 0 and int(idx[-1]) == n - 1
    w = torch.linspace(1.0, 2.0, idx.numel(), dtype=F64)
    want = float((t[idx] * w).sum())
    assert base._checksum(t) == pytest.approx(want, rel=1e-14)
    leaf = t.clone().requires_grad_()
    with torch.enable_grad():
        assert base._checksum(leaf) == base._checksum(t)
    assert leaf.grad is None and leaf.grad_fn is None
    assert base._checksum(torch.arange(5)) is None and base._checksum(torch.empty(0)) is None


def test_a_vector_solve_of_a_diagonal_equals_the_column_solve_and_carries_gradients():
    """The division's vector form gives the quotients of the one-column route bit for bit, and
    gradients to the right-hand side and to d (torch's own formula, b / d, as ground truth)."""
    n = 257
    g = torch.Generator().manual_seed(5)
    d = (torch.rand(n, generator=g, dtype=F64) + 0.5).requires_grad_()
    b = torch.randn(n, generator=g, dtype=F64, requires_grad=True)
    x = Diagonal(d).solve(b)
    col = Compiled(Diagonal(d)).solver(Diagonal(d))(b.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(x, col, rtol=0, atol=0)
    torch.testing.assert_close(x, b / d, rtol=0, atol=0)
    x.sum().backward()
    torch.testing.assert_close(b.grad, 1 / d.detach(), rtol=1e-15, atol=0)
    torch.testing.assert_close(d.grad, -b.detach() / d.detach() ** 2, rtol=1e-15, atol=0)
    B = torch.randn(n, 3, generator=g, dtype=F64)
    with torch.no_grad():
        torch.testing.assert_close(Diagonal(d).solve(B), B / d[:, None], rtol=0, atol=0)


def test_exact_type_fast_paths_keep_every_refusal_and_conversion():
    """The constructors' and checks' exact-type shortcuts (int / float before the ABC checks, one
    dtype and device before harmonising) refuse and convert what they did before."""
    import numpy as np

    from nngeo_ops.errors import ArgumentTypeError, DTypeDeviceError, InvalidArgumentError
    from nngeo_ops.nn.engine.finite import check_regul
    from nngeo_ops.ops import Sum
    from nngeo_ops.ops.base import is_scalar

    for bad in (True, 3.0, -1, "3"):
        with pytest.raises(InvalidArgumentError, match=f"got {bad!r}"):
            ScaledIdentity(1.0, bad)
    assert ScaledIdentity(2, np.int64(3)).n == 3 and ScaledIdentity(0.5, 0).shape == (0, 0)
    assert ScaledIdentity(1.0, 3, device="cpu").device == torch.device("cpu")
    assert [is_scalar(c) for c in (1, 2.5, True, np.float32(1), torch.tensor(1.0), "1")] == [
        True,
        True,
        True,
        True,
        True,
        False,
    ]
    d32 = Diagonal(torch.rand(4))
    with pytest.raises(DTypeDeviceError):
        Sum(d32, Diagonal(torch.rand(4, dtype=F64)))
    with pytest.raises(DTypeDeviceError):  # a fixed float64 identity: refused
        Sum(d32, 0.5 * Identity(4, dtype=F64))
    flexible = Sum(Diagonal(torch.rand(4, dtype=F64)), 0.5 * Identity(4))
    assert flexible.terms[1].dtype == F64 and flexible.dtype == F64
    check_regul(1e-3)
    check_regul(2)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(NonFiniteError):
            check_regul(bad)
    with pytest.raises(ArgumentTypeError):
        check_regul(True)


def test_an_empty_or_complex_diagonal_shifts_by_its_own_reduction():
    """No range to map (empty: (inf, -inf); complex: undefined): the node reduces d + c itself."""
    E = Diagonal(torch.empty(0, dtype=F64)).shifted(0.5)
    assert E.d.shape == (0,) and E._range.lo > E._range.hi
    d = torch.tensor([1 + 1j, 2 + 0j], dtype=torch.complex128)
    C = Diagonal(d).shifted(0.5)
    torch.testing.assert_close(C.d, d + 0.5, rtol=0, atol=0)
    with pytest.raises(NonFiniteError):
        Diagonal(torch.tensor([1 + 1j, complex(float("nan"), 0)])).shifted(0.5)
