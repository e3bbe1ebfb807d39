"""Generic routines for nodes without a closed form: dense below ``policy.dense_limit``,
iterative (CG, stochastic Lanczos quadrature, Hutch++, stochastic diagonal) above it.

Each fallback is registered on the base class with ``fallback=True``, so structured rules always win
and ``explain()`` names the fallback that ran.

A stochastic fallback is never silent: it emits :class:`~nngeo_ops.errors.StochasticFallbackWarning`
naming the node no exact rule matched (and the estimate's standard error), records the
:class:`~nngeo_ops.linalg.Estimate` in ``Compiled.estimates`` (shown by ``explain()``), and under
``CompilePolicy(exact=True)`` raises :class:`~nngeo_ops.errors.InexactError` instead of running.
The CG fallback is exact to its tolerance and differentiable (implicit differentiation: the
gradient is one more solve, the loop itself is not recorded).
"""

from __future__ import annotations

import warnings

import torch

from ...errors import InexactError, StochasticFallbackWarning, UnsupportedError
from ..base import LinearOperator
from ..dense import Dense
from ..registry import rule
from ..symbolic import Inverse
from . import eigh as eigh_rules
from . import logdet as logdet_rules
from . import solve as solve_rules


def _small(node: LinearOperator, ctx) -> bool:
    return node.shape[0] <= ctx.policy.dense_limit


def _densified(node: LinearOperator) -> Dense:
    return Dense(node.to_dense(), symmetric=node.symmetric or None, psd=node.psd)


def _too_big(node: LinearOperator, what: str, hint: str) -> UnsupportedError:
    return UnsupportedError(
        f"{what} of {node._str()} ({node.shape[0]}×{node.shape[1]}): no closed form, the matrix is "
        f"larger than policy.dense_limit, and {hint}"
    )


def _describe(node: LinearOperator) -> str:
    kids = node.children()
    inner = f" of [{', '.join(type(k).__name__ for k in kids)}]" if kids else ""
    return f"{node._str()} ({type(node).__name__}{inner}, {node.shape[0]}×{node.shape[1]})"


def _refuse_or_warn(node: LinearOperator, ctx, what: str, method: str) -> None:
    """Raise under ``policy.exact``; otherwise the caller runs ``method`` and reports it."""
    if ctx.policy.exact:
        raise InexactError(
            f"{what} of {_describe(node)}: no exact routine matches this node and it is larger than "
            f"policy.dense_limit={ctx.policy.dense_limit}, so only {method} could compute it; "
            "CompilePolicy(exact=True) forbids estimates. Raise dense_limit, or rewrite the "
            "expression into a structured form (see explain())"
        )


def _report(node: LinearOperator, ctx, what: str, method: str, est) -> None:
    ctx.estimates[(what, node._str())] = est
    v, e = est.value.detach(), est.stderr.detach()
    err = (
        f"{float(v):.6g} ± {float(e):.2g}" if v.dim() == 0 else f"stderr up to {float(e.max()):.2g}"
    )
    warnings.warn(
        f"{what} of {_describe(node)} is a stochastic estimate ({method}: {err}): no exact routine "
        f"matches this node and it is larger than policy.dense_limit={ctx.policy.dense_limit}. "
        "Pass CompilePolicy(exact=True) to make this an error, or raise dense_limit",
        StochasticFallbackWarning,
        stacklevel=4,
    )


class _CGSolve(torch.autograd.Function):
    """``A⁻¹ B`` by CG (``zero=True``: the value 0) with the gradient of an exact solve of a
    symmetric A: ``B̄ = A⁻¹ X̄``. The CG loop itself is never recorded by autograd."""

    @staticmethod
    def forward(ctx, B, solve, zero):
        ctx.solve = solve
        return torch.zeros_like(B) if zero else solve(B)

    @staticmethod
    def backward(ctx, grad):
        with torch.no_grad():
            return ctx.solve(grad), None, None


def _cg_solve(node: LinearOperator, ctx):
    from ...linalg import cg

    pol = ctx.policy

    def plain(X: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return cg(node, X, tol=pol.cg_tol, maxiter=pol.cg_maxiter)[0]

    def solve(X: torch.Tensor) -> torch.Tensor:
        if not (node.needs_grad() or (torch.is_grad_enabled() and X.requires_grad)):
            return plain(X)
        Y = _CGSolve.apply(X, plain, False)  # the value, and the gradient in B
        if not node.needs_grad():
            return Y
        # the gradient in A's leaves, d(A⁻¹B) = −A⁻¹ (dA) Y: one recorded product A·Y (Y held
        # fixed) whose cotangent goes through A⁻¹; the term adds nothing to the value
        return Y - _CGSolve.apply(node._matmat(Y.detach()), plain, True)

    return solve


@rule("solve", LinearOperator, name="dense factorisation (fallback)", fallback=True, priority=10)
def dense_solve_fallback(node, ctx):
    return solve_rules.dense_solve(_densified(node), ctx) if _small(node, ctx) else None


@rule("solve", LinearOperator, name="conjugate gradients (iterative fallback)", fallback=True)
def cg_solve_fallback(node, ctx):
    if not node.psd:
        raise _too_big(node, "solve", "CG needs a node tagged symmetric PSD")
    return _cg_solve(node, ctx)


@rule("slogdet", LinearOperator, name="dense slogdet (fallback)", fallback=True, priority=10)
def dense_slogdet_fallback(node, ctx):
    return logdet_rules.dense_slogdet(_densified(node), ctx) if _small(node, ctx) else None


@rule("slogdet", LinearOperator, name="stochastic Lanczos quadrature (estimate)", fallback=True)
def slq_slogdet_fallback(node, ctx):
    if not node.psd:
        raise _too_big(node, "logdet", "SLQ needs a node tagged symmetric PSD")
    from ...linalg import slq_logdet

    method = "stochastic Lanczos quadrature"
    _refuse_or_warn(node, ctx, "logdet", method)
    pol = ctx.policy
    steps = pol.lanczos_steps
    est = slq_logdet(
        node,
        num_probes=max(pol.num_matvecs // steps, 1),
        num_iter=steps,
        generator=pol.rng(node.device),
    )
    _report(node, ctx, "logdet", method, est)
    return torch.ones((), dtype=node.dtype, device=node.device), est.value


@rule("diag", LinearOperator, name="dense diagonal (fallback)", fallback=True, priority=20)
def dense_diag_fallback(node, ctx):
    if isinstance(node, Inverse) and _small(node, ctx):
        return torch.linalg.inv(node.child.to_dense()).diagonal()
    return node.to_dense().diagonal() if _small(node, ctx) else None


def _affordable(node: LinearOperator, ctx) -> bool:
    """Whether n unit-vector products fit the stochastic budget (then the exact answer is cheaper)."""
    return node.shape[0] <= ctx.policy.num_matvecs


@rule(
    "diag",
    LinearOperator,
    name="diagonal from n unit products (fallback)",
    fallback=True,
    priority=10,
)
def unit_products_diag_fallback(node, ctx):
    if not _affordable(node, ctx):
        return None
    from ...linalg import exact_diag

    return exact_diag(node)


@rule("diag", LinearOperator, name="stochastic diagonal estimate", fallback=True)
def stochastic_diag_fallback(node, ctx):
    from ...linalg import diag_estimate

    method = "stochastic diagonal estimation"
    _refuse_or_warn(node, ctx, "diag", method)
    pol = ctx.policy
    est = diag_estimate(node, pol.num_matvecs, generator=pol.rng(node.device))
    _report(node, ctx, "diag", method, est)
    return est.value


@rule("trace", LinearOperator, name="sum of diagonal / Hutch++ (fallback)", fallback=True)
def trace_fallback(node, ctx):
    d = ctx.diag_of(node, structured_only=True)
    if d is not None:
        return d.sum()
    if _small(node, ctx) or _affordable(node, ctx):
        return ctx.diag_of(node).sum()
    from ...linalg import hutchpp

    _refuse_or_warn(node, ctx, "trace", "Hutch++")
    pol = ctx.policy
    est = hutchpp(node, pol.num_matvecs, generator=pol.rng(node.device))
    _report(node, ctx, "trace", "Hutch++", est)
    return est.value


@rule("frobenius", LinearOperator, name="dense norm (fallback)", fallback=True)
def frobenius_fallback(node, ctx):
    if _small(node, ctx) or _affordable(node, ctx):
        return torch.linalg.matrix_norm(node.to_dense())
    from ...linalg import hutchpp

    _refuse_or_warn(node, ctx, "frobenius", "Hutch++ on AᵀA")
    pol = ctx.policy
    est = hutchpp(node.T @ node, pol.num_matvecs, generator=pol.rng(node.device))
    _report(node, ctx, "frobenius", "Hutch++ on AᵀA (the estimate of ‖A‖²)", est)
    value = est.value
    return torch.sqrt(torch.as_tensor(value).clamp_min(0))


@rule("eigh", LinearOperator, name="dense eigh (fallback)", fallback=True)
def eigh_fallback(node, ctx):
    if not _small(node, ctx):
        raise _too_big(node, "eigh", "a full spectrum is out of reach: use linalg.lanczos(A, k)")
    return eigh_rules.dense_eigh(_densified(node), ctx)
