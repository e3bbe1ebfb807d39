"""``linalg.symv``: the product of a bitwise symmetric matrix with one vector through BLAS ``symv``
(one triangle read), against torch's product in float64 and the cases where it must not apply."""

from __future__ import annotations

import pytest
import torch

from nngeo_ops.linalg import symv as S


def sym(n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    return ((A + A.mT) / 2).to(dtype)  # a + b = b + a: bitwise symmetric


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["row", "col"])
@pytest.mark.parametrize("shape", ["vec", "col"])
def test_symv_matches_the_product(dtype, layout, shape):
    n = S.SYMV_MIN_SIZE + 37
    M = sym(n, dtype)
    if layout == "col":
        M = M.mT.contiguous().mT
    x = torch.randn(n, dtype=torch.float64).to(dtype)
    if shape == "col":
        x = x[:, None]
    assert S.symv_applies(M, x)
    y = S.symv(M, x)
    ref = M.double() @ x.double()
    assert y.shape == x.shape and y.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 2e-5
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max() * n**0.5


def test_symv_writes_into_out():
    n = S.SYMV_MIN_SIZE
    M, x = sym(n, torch.float64), torch.randn(n, dtype=torch.float64)
    out = torch.full((n,), torch.nan, dtype=torch.float64)
    y = S.symv(M, x, out=out)
    assert y is out and y.data_ptr() == out.data_ptr()
    torch.testing.assert_close(out, M @ x, rtol=1e-12, atol=1e-12)


def test_symv_reads_one_triangle():
    # the strictly lower triangle of a row-major M is never read: garbage there changes nothing
    n = S.SYMV_MIN_SIZE
    M, x = sym(n, torch.float64), torch.randn(n, dtype=torch.float64)
    ref = S.symv(M, x)
    M.masked_fill_(torch.ones(n, n, dtype=torch.bool).tril_(-1), 1e300)
    assert torch.equal(S.symv(M, x), ref)


def test_where_symv_does_not_apply():
    n = S.SYMV_MIN_SIZE
    M, x = sym(n, torch.float64), torch.randn(n, dtype=torch.float64)
    assert S.symv_applies(M, x)
    small = sym(n - 1, torch.float64)
    assert not S.symv_applies(small, x[: n - 1])  # the wrapper's fixed cost would dominate
    assert not S.symv_applies(M, x.float())  # mixed precision
    assert not S.symv_applies(M.to(torch.bfloat16), x.to(torch.bfloat16))
    strided = torch.zeros(n, 2 * n, dtype=torch.float64)[:, ::2]
    assert not S.symv_applies(strided, x)  # would make scipy copy the matrix
    w = x.clone().requires_grad_(True)
    assert not S.symv_applies(M, w)  # autograd records torch's product instead
    with torch.no_grad():
        assert S.symv_applies(M, w)
    assert not S.symv_applies(M, torch.randn(n, 2, dtype=torch.float64))


def test_symv_runs_with_torchs_thread_count_and_restores_the_pool(monkeypatch):
    pools = S._pools()
    if not pools:
        pytest.skip("threadpoolctl sees no BLAS pool of scipy")
    before = [c.get_num_threads() for c in pools]
    seen = []
    real = S._blas

    def spy(dtype):
        fn = real(dtype)

        def wrapped(*a, **k):
            seen.append([c.get_num_threads() for c in pools])
            return fn(*a, **k)

        return wrapped

    monkeypatch.setattr(S, "_blas", spy)
    n = S.SYMV_MIN_SIZE
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        S.symv(sym(n, torch.float64), torch.randn(n, dtype=torch.float64))
    finally:
        torch.set_num_threads(old)
    assert seen == [[1] * len(pools)]
    assert [c.get_num_threads() for c in pools] == before
