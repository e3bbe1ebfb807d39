"""``Kronecker(…) + λ·I`` for factors that are not tagged: the eigen route for symmetric factors
(detected exactly), Bartels–Stewart through Schur forms for non-symmetric ones, against dense
float64 ``solve`` / ``slogdet``. ``dense_limit=0`` keeps the dense fallback from hiding the route.
"""

from __future__ import annotations

import pytest
import torch

from nngeo_ops.errors import SingularError
from nngeo_ops.ops import CompilePolicy, Dense, Identity, Kronecker

F64 = torch.float64
EXACT = CompilePolicy(dense_limit=0, exact=True)


def _mats(sizes, seed, symmetric):
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in sizes:
        B = torch.randn(n, n, generator=g, dtype=F64)
        # B Bᵀ is not bitwise symmetric in floating point; its symmetric part is
        out.append((B @ B.mT + (B @ B.mT).mT) / (2 * n) if symmetric else B)
    return out


def _dense_kron(ms):
    out = ms[0]
    for m in ms[1:]:
        out = torch.kron(out, m)
    return out


@pytest.mark.parametrize(
    "sizes, symmetric, route",
    [
        ((5, 7), True, "eigen form"),
        ((5, 7), False, "Bartels–Stewart"),
        ((3, 4, 5), False, "Bartels–Stewart"),
        ((6, 4), False, "Bartels–Stewart"),
    ],
)
@pytest.mark.parametrize("scale", [1.0, -2.5])
def test_kronecker_plus_shift_untagged(sizes, symmetric, route, scale):
    ms = _mats(sizes, seed=len(sizes) + int(symmetric), symmetric=symmetric)
    lam = 0.7
    n = _dense_kron(ms).shape[0]
    op = scale * Kronecker(*[Dense(m) for m in ms]) + lam * Identity(n)  # no tags given
    dense = scale * _dense_kron(ms) + lam * torch.eye(n, dtype=F64)
    c = op.compile(EXACT)
    B = torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=F64)
    torch.testing.assert_close(c.solve(B), torch.linalg.solve(dense, B))
    s, la = c.slogdet()
    s_ref, la_ref = torch.linalg.slogdet(dense)
    assert float(s) == float(s_ref)
    torch.testing.assert_close(la, la_ref)
    assert route in c.routine("solve") or route in str(c.simplified) or route in c.explain()


def test_routes_are_named_in_explain():
    A, G = _mats((4, 3), seed=5, symmetric=False)
    c = (Kronecker(Dense(A), Dense(G)) + 0.5 * Identity(12)).compile(EXACT)
    c.solve(torch.ones(12, dtype=F64))
    c.slogdet()
    text = c.explain()
    assert "Bartels–Stewart" in text and "Schur eigenvalues" in text
    assert "schur" in text  # the Schur forms are cached on the factors


def test_singular_shift_is_refused():
    A = torch.diag(torch.tensor([1.0, 2.0], dtype=F64)) + torch.triu(torch.ones(2, 2, dtype=F64), 1)
    G = torch.tensor([[1.0, 5.0], [0.0, 3.0]], dtype=F64)
    op = Kronecker(Dense(A), Dense(G)) + (-2.0) * Identity(4)  # α=1, γ=... 1·2 − 2 = 0
    with pytest.raises(SingularError, match="change the shift"):
        op.compile(EXACT).solve(torch.ones(4, dtype=F64))
