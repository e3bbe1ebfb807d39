"""Iterative and stochastic fallbacks: never silent, refusable, differentiable.

A node with no closed form, larger than ``policy.dense_limit`` (here 0, so that small matrices
exercise the same path), gets CG for solves (exact to tolerance, differentiable by implicit
differentiation) and stochastic estimates for logdet / diag / trace, each announced by a
``StochasticFallbackWarning`` naming the node, recorded with its standard error, and refused under
``CompilePolicy(exact=True)``.
"""

from __future__ import annotations

import pytest
import torch

from nngeo_ops.errors import InexactError, StochasticFallbackWarning
from nngeo_ops.ops import CompilePolicy, Dense, MatFree

F64 = torch.float64
N = 30
BUDGET = 20  # fewer products than N: the exact diagonal from N unit products is out of budget


def _matrix(requires_grad=False):
    g = torch.Generator().manual_seed(0)
    B = torch.randn(N, N, generator=g, dtype=F64)
    M = B @ B.mT / N + torch.eye(N, dtype=F64)
    return M.requires_grad_(requires_grad)


def _op(M):
    """``M + I`` where the identity is matrix-free: no structured rule applies to the sum."""
    eye = MatFree(lambda X: X, (N, N), F64, symmetric=True, psd=True, batched=True, name="E")
    return Dense(M, psd=True) + eye


@pytest.mark.parametrize(
    "what, method",
    [("logdet", "Lanczos"), ("diag", "diagonal estimation"), ("trace", "Hutch++")],
)
def test_stochastic_fallback_warns_names_the_node_and_records_the_error(what, method):
    M = _matrix()
    c = _op(M).compile(CompilePolicy(dense_limit=0, num_matvecs=BUDGET, lanczos_steps=5))
    # the trace of a sum is the sum of traces: the matrix-free term alone blocks the exact route
    node = "E" if what == "trace" else "M+E"
    described = "E (MatFree" if what == "trace" else "M+E (Sum of [Dense, MatFree]"
    with pytest.warns(StochasticFallbackWarning, match=method) as record:
        value = getattr(c, what)()
    assert any(described in str(w.message) and "exact=True" in str(w.message) for w in record)
    est = c.estimates[(what, node)]
    assert bool((est.stderr > 0).all())
    if what != "trace":
        assert torch.equal(est.value, value)
    assert "estimated (stochastic, not exact)" in c.explain()
    truth = {
        "logdet": torch.logdet(M + torch.eye(N, dtype=F64)),
        "diag": M.diagonal() + 1,
        "trace": M.trace() + N,
    }[what]
    # the estimate is within a few standard errors (or 10 %) of the truth
    err = (value - truth).abs()
    assert bool((err <= torch.maximum(6 * est.stderr, 0.1 * truth.abs())).all())


@pytest.mark.parametrize("what", ["logdet", "diag", "trace", "frobenius_norm"])
def test_exact_policy_refuses_estimates(what):
    c = _op(_matrix()).compile(CompilePolicy(dense_limit=0, num_matvecs=BUDGET, exact=True))
    with pytest.raises(InexactError, match="exact=True") as info:
        getattr(c, what)()
    blocker = "E (MatFree" if what == "trace" else "M+E (Sum of [Dense, MatFree]"
    assert blocker in str(info.value) and "dense_limit" in str(info.value)


def test_exact_results_within_the_budget_do_not_warn(recwarn):
    c = _op(_matrix()).compile(CompilePolicy(dense_limit=0, exact=True))  # N ≤ num_matvecs
    torch.testing.assert_close(c.diag(), _matrix().diagonal() + 1)
    torch.testing.assert_close(c.trace(), _matrix().trace() + N)
    assert not [w for w in recwarn if issubclass(w.category, StochasticFallbackWarning)]


def test_exact_policy_keeps_exact_routes():
    c = _op(_matrix()).compile(CompilePolicy(exact=True))  # small: the dense fallback is exact
    torch.testing.assert_close(c.logdet(), torch.logdet(_matrix() + torch.eye(N, dtype=F64)))


def test_cg_fallback_is_differentiable():
    M = _matrix(requires_grad=True)
    b = torch.randn(N, dtype=F64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    c = _op(M).compile(CompilePolicy(dense_limit=0, cg_tol=1e-12))
    x = c.solve(b)
    assert c.routine("solve") == "conjugate gradients (iterative fallback)"
    g = torch.autograd.grad((x**3).sum(), (M, b))
    M2, b2 = _matrix(requires_grad=True), b.detach().clone().requires_grad_(True)
    x2 = torch.linalg.solve(M2 + torch.eye(N, dtype=F64), b2)
    g2 = torch.autograd.grad((x2**3).sum(), (M2, b2))
    torch.testing.assert_close(x.detach(), x2.detach())
    for a, e in zip(g, g2):
        torch.testing.assert_close(a, e)
