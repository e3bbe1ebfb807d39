"""Public hooks of ``ops`` that the layers above use instead of private names (tests/test_layering.py
forbids apps/ to import private names; these are the public ways in)."""

from __future__ import annotations

import torch

from nngeo_ops.ops import Compiled, Dense, Diagonal, LowRank

F64 = torch.float64


def _spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    B = torch.randn(n, n, generator=g, dtype=F64)
    return B @ B.mT / n + 0.1 * torch.eye(n, dtype=F64)


def test_compiled_is_the_form_the_convenience_calls_use():
    g = torch.Generator().manual_seed(0)
    d, U = torch.rand(8, dtype=F64, generator=g) + 0.5, torch.randn(8, 2, dtype=F64, generator=g)
    A = Diagonal(d) + LowRank(U)
    c = A.compiled()
    assert isinstance(c, Compiled) and A.compiled() is c  # cached on the node
    b = torch.randn(8, dtype=F64, generator=g)
    x = A.solve(b)
    torch.testing.assert_close(x, torch.linalg.solve(torch.diag(d) + U @ U.mT, b))
    # the route of A.solve is visible on the cached compiled form
    assert c.routine("solve") == "Woodbury (structured + low rank)"
    assert "Woodbury" in A.compiled().explain()


def test_compiled_is_renewed_after_an_in_place_update_and_not_cached_under_grad():
    M = _spd(5, 1)
    A = Dense(M.clone(), psd=True)
    c = A.compiled()
    A.M.mul_(2.0)  # in-place update of the leaf: the cached form is stale
    c2 = A.compiled()
    assert c2 is not c
    b = torch.ones(5, dtype=F64)
    torch.testing.assert_close(A.solve(b), torch.linalg.solve(2.0 * M, b))
    L = torch.randn(5, 5, dtype=F64, requires_grad=True)
    B = Dense(L @ L.mT + torch.eye(5, dtype=F64), psd=True)
    assert B.compiled() is not B.compiled()  # a fresh graph per call while autograd records
