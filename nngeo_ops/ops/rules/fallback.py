"""Generic routines for nodes without a closed form: dense below ``policy.dense_limit``,
iterative (CG, stochastic Lanczos quadrature, Hutch++, stochastic diagonal) above it.

Each fallback is registered on the base class with ``fallback=True``, so structured rules always win
and ``explain()`` names the fallback that ran.
"""

from __future__ import annotations

import torch

from ...errors import UnsupportedError
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


@rule("solve", LinearOperator, name="dense factorisation (fallback)", fallback=True)
def dense_solve_fallback(node, ctx):
    return solve_rules.dense_solve(_densified(node), ctx) if _small(node, ctx) else None


@rule("solve", LinearOperator, name="conjugate gradients (iterative fallback)", fallback=True)
def cg_solve_fallback(node, ctx):
    if not node.psd:
        raise _too_big(node, "solve", "CG needs a node tagged symmetric PSD")
    from ...linalg import cg

    pol = ctx.policy
    return lambda X: cg(node, X, tol=pol.cg_tol, maxiter=pol.cg_maxiter)[0]


@rule("slogdet", LinearOperator, name="dense slogdet (fallback)", fallback=True)
def dense_slogdet_fallback(node, ctx):
    return logdet_rules.dense_slogdet(_densified(node), ctx) if _small(node, ctx) else None


@rule("slogdet", LinearOperator, name="stochastic Lanczos quadrature (estimate)", fallback=True)
def slq_slogdet_fallback(node, ctx):
    if not node.psd:
        raise _too_big(node, "logdet", "SLQ needs a node tagged symmetric PSD")
    from ...linalg import slq_logdet

    pol = ctx.policy
    steps = pol.lanczos_steps
    est = slq_logdet(
        node,
        num_probes=max(pol.num_matvecs // steps, 1),
        num_iter=steps,
        generator=pol.generator(node.device),
    )
    value = est.value
    return torch.ones((), dtype=node.dtype, device=node.device), value


@rule("diag", LinearOperator, name="dense diagonal (fallback)", fallback=True)
def dense_diag_fallback(node, ctx):
    if isinstance(node, Inverse) and _small(node, ctx):
        return torch.linalg.inv(node.child.to_dense()).diagonal()
    return node.to_dense().diagonal() if _small(node, ctx) else None


@rule("diag", LinearOperator, name="stochastic diagonal estimate", fallback=True)
def stochastic_diag_fallback(node, ctx):
    from ...linalg import diag_estimate

    pol = ctx.policy
    est = diag_estimate(node, pol.num_matvecs, generator=pol.generator(node.device))
    return est.value


@rule("trace", LinearOperator, name="sum of diagonal / Hutch++ (fallback)", fallback=True)
def trace_fallback(node, ctx):
    d = ctx.diag_of(node, structured_only=True)
    if d is not None:
        return d.sum()
    if _small(node, ctx):
        return ctx.diag_of(node).sum()
    from ...linalg import hutchpp

    pol = ctx.policy
    est = hutchpp(node, pol.num_matvecs, generator=pol.generator(node.device))
    return est.value


@rule("frobenius", LinearOperator, name="dense norm (fallback)", fallback=True)
def frobenius_fallback(node, ctx):
    if _small(node, ctx):
        return torch.linalg.matrix_norm(node.to_dense())
    from ...linalg import hutchpp

    pol = ctx.policy
    est = hutchpp(node.T @ node, pol.num_matvecs, generator=pol.generator(node.device))
    value = est.value
    return torch.sqrt(torch.as_tensor(value).clamp_min(0))


@rule("eigh", LinearOperator, name="dense eigh (fallback)", fallback=True)
def eigh_fallback(node, ctx):
    if not _small(node, ctx):
        raise _too_big(node, "eigh", "a full spectrum is out of reach: use linalg.lanczos(A, k)")
    return eigh_rules.dense_eigh(_densified(node), ctx)
