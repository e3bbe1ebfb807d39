"""The shared pieces of the Woodbury routes, computed once per compilation for solve and logdet.

Two patterns of a ``Sum``:

- :func:`woodbury_parts`: ``A = B + U C Vᵀ`` with ``B`` structured (it has a closed-form solve) and
  one square ``LowRank`` term; the r × r capacitance ``S = I + C Vᵀ B⁻¹ U`` gives the solve
  (Woodbury identity) and the log-determinant (matrix determinant lemma).
- :func:`wide_congruence_parts`: ``A = Xᵀ M X + c·I`` with ``X`` wide (m < n, a Gauss-Newton
  matrix ``Jᵀ H J`` over fewer outputs than parameters); the m × m system ``S = c·I + K M`` with
  ``K = X Xᵀ`` gives both in function space.

The pieces are small frozen dataclasses, memoised with :meth:`~nngeo_ops.ops.Compiled.memo`, so
that the solve and the log-determinant of one compilation share one factorisation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...errors import NonFiniteError, SingularError
from ..base import LinearOperator, Scalar, scalar_float
from ..composites import Product, Sum
from ..diagonal import ScaledIdentity
from ..lowrank import LowRank
from ._util import congruence_gram


@dataclass(frozen=True, eq=False)
class WoodburyParts:
    """``A = B + U C Vᵀ`` prepared once (shapes for ``A`` n × n and rank r).

    Attributes:
        B: the structured rest of the sum (a node with a structured solve).
        solve_B: ``X ↦ B⁻¹X`` for X of shape (n, k).
        BinvU: ``B⁻¹U``, (n, r).
        C: the core of the low-rank term, (r, r) (the identity when the term has none).
        V: the right factor, (n, r) (``U`` for a symmetric term).
        capacitance: ``S = I + C Vᵀ B⁻¹ U``, (r, r); no inverse of ``C`` is needed.
        lu: ``torch.linalg.lu_factor(S)``: ``(LU, pivots)``.
    """

    B: LinearOperator
    solve_B: Callable[[torch.Tensor], torch.Tensor]
    BinvU: torch.Tensor
    C: torch.Tensor
    V: torch.Tensor
    capacitance: torch.Tensor
    lu: tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True, eq=False)
class WideCongruenceParts:
    """``A = Xᵀ M X + c·I`` with ``X`` of shape (m, n), m < n, prepared once.

    Attributes:
        X: the wide outer factor (a node), (m, n).
        M: the core as a dense matrix, (m, m), in float64 for float32 operands.
        c: the shift (a Python number or a 0-dim tensor).
        system: ``S = c·I + K M`` with ``K = X Xᵀ``, (m, m), in the dtype of ``M``.
        lu: ``(LU, pivots)`` of ``S`` (checked non-singular).
    """

    X: LinearOperator
    M: torch.Tensor
    c: Scalar
    system: torch.Tensor
    lu: tuple[torch.Tensor, torch.Tensor]


def woodbury_parts(node: Sum, ctx) -> WoodburyParts | None:
    """:class:`WoodburyParts` of ``node = B + U C Vᵀ``, or None when it is not of that form (one
    square ``LowRank`` term, and a rest ``B`` with a structured solve). Memoised per compilation.
    """
    return ctx.memo("woodbury", node, lambda: _woodbury_parts(node, ctx))


def _woodbury_parts(node: Sum, ctx) -> WoodburyParts | None:
    lrs = [t for t in node.terms if isinstance(t, LowRank)]
    if not (len(lrs) == 1 and lrs[0].shape[0] == lrs[0].shape[1]):
        return None
    L = lrs[0]
    rest = [t for t in node.terms if t is not L]
    B = rest[0] if len(rest) == 1 else ctx.simplify(Sum(*rest))
    b_solve = ctx.solver(B, structured_only=True)
    if b_solve is None:
        return None
    C = L.core()
    BU = b_solve(L.U)
    S = torch.eye(L.rank, dtype=L.dtype, device=L.device) + C @ (L.Vm.mT @ BU)
    return WoodburyParts(B, b_solve, BU, C, L.Vm, S, torch.linalg.lu_factor(S))


def wide_congruence_parts(node: Sum, ctx) -> WideCongruenceParts | None:
    """:class:`WideCongruenceParts` of ``node = Xᵀ M X + c·I`` (c ≠ 0, X wide), or None.

    ``K = X Xᵀ`` and a dense ``M`` come from :func:`~._util.congruence_gram` (K from ``X.gram()``
    or from m products with X and Xᵀ; m ≤ ``policy.dense_limit``, so everything formed is m × m).
    Memoised per compilation.
    """
    return ctx.memo("wide congruence", node, lambda: _wide_congruence_parts(node, ctx))


def _wide_congruence_parts(node: Sum, ctx) -> WideCongruenceParts | None:
    shifts = [t for t in node.terms if isinstance(t, ScaledIdentity)]
    rest = [t for t in node.terms if not isinstance(t, ScaledIdentity)]
    if not (len(shifts) == 1 and len(rest) == 1 and scalar_float(shifts[0].c) != 0.0):
        return None
    t, c = rest[0], shifts[0].c
    wide_x = isinstance(t, Product) and t.shape[0] > t.factors[-1].shape[0]
    cong = congruence_gram(t, ctx, from_products=True) if wide_x else None
    if cong is None:
        return None
    X, Md, K = cong
    m = X.shape[0]
    # the m × m system in float64 for float32 operands: it carries the damping's
    # conditioning, and m ≤ dense_limit keeps it cheap next to the passes over data
    S = c * torch.eye(m, dtype=Md.dtype, device=X.device) + K @ Md
    if not bool(torch.isfinite(S).all()):
        raise NonFiniteError(
            f"{node._str()}: the function-space system has NaN or inf entries (from "
            "X Xᵀ or M); check the data and the model outputs"
        )
    LU, piv, info = torch.linalg.lu_factor_ex(S)
    if int(info) != 0:  # det(c·I + XᵀMX) = c^(n-m)·det(S): the operator is singular
        raise SingularError(
            f"{node._str()} is singular (its {m}×{m} function-space system has a zero "
            "pivot); increase the damping"
        )
    return WideCongruenceParts(X, Md, c, S, (LU, piv))
