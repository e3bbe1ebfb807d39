"""Batched, preconditioned conjugate gradients for symmetric positive definite systems."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nngeo_ops.errors import (
    ConvergenceWarning,
    DTypeDeviceError,
    InvalidArgumentError,
    NotPSDError,
    NotSymmetricError,
    ShapeError,
)

from ._common import check_finite, refuse_low_precision, resolve_settings
from ._matvec import (
    MatmatOperator,
    as_matmat,
    as_square_matmat,
    check_symmetric_if_dense,
)

__all__ = ["CGSettings", "CGInfo", "cg"]


@dataclass(frozen=True)
class CGSettings:
    """Settings of :func:`cg`.

    Attributes:
        tol: relative tolerance; column j stops once ‖b_j − A x_j‖ ≤ max(tol·‖b_j‖, atol).
        atol: absolute tolerance (see ``tol``).
        maxiter: iteration cap; ``None`` means ``10·n`` (as scipy).
        record_history: keep the residual norms of every iteration in ``CGInfo.history``.
    """

    tol: float = 1e-8
    atol: float = 0.0
    maxiter: int | None = None
    record_history: bool = False

    def __post_init__(self) -> None:
        if not self.tol >= 0 or not self.atol >= 0:
            raise InvalidArgumentError(
                f"tol and atol must be >= 0, got tol={self.tol}, atol={self.atol}"
            )
        if self.maxiter is not None and (not isinstance(self.maxiter, int) or self.maxiter < 0):
            raise InvalidArgumentError(
                f"maxiter must be a non-negative int or None, got {self.maxiter!r}"
            )


@dataclass
class CGInfo:
    """What happened in a :func:`cg` run.

    Attributes:
        converged: bool tensor of shape (k,), one entry per right-hand side (k = 1 for a vector B).
        iterations: number of iterations run (the largest over the columns).
        column_iterations: int tensor (k,), iterations each column took before it was frozen.
        residual_norms: (k,) final residual norms, as tracked by the CG recurrence (this equals
            ‖b − A x‖ up to rounding; it is not recomputed, to save a product).
        history: when ``record_history`` was set, a list with the (k,) residual norms before the
            first iteration and after each iteration (frozen columns repeat their last value).
    """

    converged: torch.Tensor
    iterations: int
    column_iterations: torch.Tensor
    residual_norms: torch.Tensor
    history: list[torch.Tensor] | None = field(default=None, repr=False)

    @property
    def all_converged(self) -> bool:
        """Whether every right-hand-side column reached the tolerance."""
        return bool(self.converged.all())


def _as_preconditioner(
    M: object, op: MatmatOperator
) -> Callable[[torch.Tensor], torch.Tensor] | None:
    if M is None:
        return None
    n = op.shape[0]
    is_plain_callable = callable(M) and not hasattr(M, "shape")
    if is_plain_callable:
        pre = as_matmat(M, shape=(n, n), dtype=op.dtype, device=op.device)
    else:
        pre = as_matmat(M)
    if pre.shape != (n, n):
        raise ShapeError(f"cg: preconditioner M has shape {pre.shape}, expected ({n}, {n})")
    return pre.matmat


def cg(
    A: object,
    B: torch.Tensor,
    *,
    M: object = None,
    x0: torch.Tensor | None = None,
    settings: CGSettings | None = None,
    **overrides: object,
) -> tuple[torch.Tensor, CGInfo]:
    """Solve ``A X = B`` for symmetric positive definite ``A`` by conjugate gradients.

    All k right-hand sides are iterated together, so each iteration costs one product of A with
    the (n, k_active) block of still-active directions; every column has its own step sizes
    α_j = r_jᵀz_j / p_jᵀAp_j and β_j, and a column is frozen as soon as it meets its tolerance
    ‖r_j‖ ≤ max(tol·‖b_j‖, atol). With a preconditioner ``M ≈ A⁻¹`` (SPD), the directions are
    built from z = M r (preconditioned CG); the stopping test still uses the true residual norm.

    Args:
        A: SPD operator of shape (n, n) (tensor, operator object, :class:`MatmatOperator`, or a
            callable on (n, k) matrices, whose shape/dtype/device are then taken from ``B``).
        B: right-hand side, shape (n,) or (n, k), same dtype and device as ``A``.
        M: optional preconditioner applying ``M⁻¹ ≈ A⁻¹``: any operator form, or a callable on
            (n, k) matrices.
        x0: optional initial guess, same shape as ``B``.
        settings: a :class:`CGSettings`; keyword ``overrides`` (``tol=``, ``atol=``,
            ``maxiter=``, ``record_history=``) replace its fields.

    Returns:
        ``(X, info)``: X has the shape of ``B``; ``info`` is a :class:`CGInfo`.

    Raises:
        NotPSDError: a curvature pᵀAp ≤ 0 (A not positive definite) or rᵀMr ≤ 0 (M not PD).
        ShapeError: B, x0 or M of the wrong shape, non-square A.
        NonFiniteError: NaN/inf in B or x0, or produced by the iteration.

    Warns:
        ConvergenceWarning: some column did not reach its tolerance within ``maxiter``.
    """
    s = resolve_settings(CGSettings, settings, overrides)
    if not isinstance(B, torch.Tensor):
        raise ShapeError(
            f"B must be a torch.Tensor of shape (n,) or (n, k), got {type(B).__name__}"
        )
    op = as_square_matmat(A, like=B, what="cg")
    refuse_low_precision(op.dtype, "cg")
    # CG is defined for symmetric A only: on anything else it returns a wrong answer or stalls,
    # which would then read as "raise maxiter". Dense tensors are checked (O(n²)); operators
    # tagged symmetric=False (the lazy nodes of nngeo_ops.ops) are refused.
    check_symmetric_if_dense(A, "cg")
    if getattr(A, "symmetric", None) is False and not isinstance(A, (torch.Tensor, MatmatOperator)):
        raise NotSymmetricError(
            f"cg needs a symmetric positive definite operator, but this {type(A).__name__} is "
            "tagged symmetric=False; for a general square system use scipy's gmres on "
            "to_scipy(A), or tag the operator symmetric if it is (e.g. psd=True on its leaves)"
        )
    n = op.shape[0]
    vector = B.ndim == 1
    if B.ndim not in (1, 2) or B.shape[0] != n:
        raise ShapeError(
            f"cg: A has shape {op.shape} but B has shape {tuple(B.shape)}; "
            f"B must be ({n},) or ({n}, k)"
        )
    if B.dtype != op.dtype or B.device != op.device:
        raise DTypeDeviceError(
            f"cg: A is ({op.dtype}, {op.device}) but B is ({B.dtype}, {B.device}); "
            "convert B with B.to(dtype=..., device=...)"
        )
    Bm = B.reshape(n, 1) if vector else B
    check_finite(Bm, "B")
    k = Bm.shape[1]
    precond = _as_preconditioner(M, op)
    maxiter = 10 * n if s.maxiter is None else s.maxiter

    if x0 is None:
        X = torch.zeros_like(Bm)
        R = Bm.clone()
    else:
        if tuple(x0.shape) != tuple(B.shape):
            raise ShapeError(f"x0 has shape {tuple(x0.shape)} but B has shape {tuple(B.shape)}")
        check_finite(x0, "x0")
        X = x0.reshape(n, k).to(dtype=Bm.dtype, device=Bm.device).clone()
        R = Bm - op.matmat(X)

    bnorm = torch.linalg.vector_norm(Bm, dim=0)
    threshold = torch.clamp(s.tol * bnorm, min=s.atol)
    rnorm = torch.linalg.vector_norm(R, dim=0)
    # A zero right-hand side has the exact answer zero, whatever x0 was.
    zero_rhs = bnorm == 0
    if bool(zero_rhs.any()):
        X[:, zero_rhs] = 0
        R[:, zero_rhs] = 0
        rnorm = torch.where(zero_rhs, torch.zeros_like(rnorm), rnorm)
    active = rnorm > threshold
    col_iters = torch.zeros(k, dtype=torch.long, device=Bm.device)
    history = [rnorm.clone()] if s.record_history else None

    Z = precond(R) if precond is not None else R
    P = Z.clone()
    rz = (R * Z).sum(0)
    it = 0
    while it < maxiter and bool(active.any()):
        idx = active.nonzero().squeeze(1)
        if precond is not None and bool((rz[idx] <= 0).any()):
            j = int(idx[rz[idx] <= 0][0])
            raise NotPSDError(
                f"cg: the preconditioner is not positive definite (rᵀM r = {float(rz[j]):.3g} "
                f"<= 0 for column {j} at iteration {it}); M must be SPD"
            )
        Pa = P[:, idx]
        APa = op.matmat(Pa)
        check_finite(APa, "A·p (the operator produced NaN/inf from finite input)")
        pAp = (Pa * APa).sum(0)
        bad = ~(pAp > 0)
        if bool(bad.any()):
            j = int(bad.nonzero()[0])
            raise NotPSDError(
                f"cg: A is not positive definite: found curvature pᵀAp = {float(pAp[j]):.3g} "
                f"<= 0 for column {int(idx[j])} at iteration {it}. CG needs an SPD matrix; for a "
                "PSD but singular A add damping (A + λI), for an indefinite one use MINRES"
            )
        alpha = rz[idx] / pAp
        X[:, idx] += alpha * Pa
        Ra = R[:, idx] - alpha * APa
        R[:, idx] = Ra
        Za = precond(Ra) if precond is not None else Ra
        rz_new = (Ra * Za).sum(0)
        beta = rz_new / rz[idx]
        P[:, idx] = Za + beta * Pa
        rz[idx] = rz_new
        rn = torch.linalg.vector_norm(Ra, dim=0)
        if not bool(torch.isfinite(rn).all()) or not bool(torch.isfinite(rz_new).all()):
            if precond is not None:
                check_finite(precond(Ra), "M·r (the preconditioner produced NaN/inf)")
            raise NotPSDError(
                f"cg broke down at iteration {it} (NaN/inf in the recurrence from finite products "
                "of A): A is singular or indefinite on this right-hand side (a right-hand side "
                "outside the range of a singular A has no solution); add damping (A + λI)"
            )
        rnorm[idx] = rn
        col_iters[idx] += 1
        active[idx] = rn > threshold[idx]
        it += 1
        if history is not None:
            history.append(rnorm.clone())

    converged = ~active
    if not bool(converged.all()):
        bad_cols = (~converged).nonzero().squeeze(1).tolist()
        rel = (rnorm / torch.where(bnorm > 0, bnorm, torch.ones_like(bnorm)))[~converged]
        warnings.warn(
            f"cg did not converge in {maxiter} iterations for column(s) {bad_cols[:10]} "
            f"(relative residual up to {float(rel.max()):.3g}, tol={s.tol}). A singular A (zero "
            "eigenvalues: add damping A + λI) or one that is not symmetric also stalls CG; "
            "otherwise raise maxiter, loosen tol or use a preconditioner",
            ConvergenceWarning,
            stacklevel=2,
        )
    info = CGInfo(
        converged=converged,
        iterations=it,
        column_iterations=col_iters,
        residual_norms=rnorm,
        history=history,
    )
    return (X.reshape(n) if vector else X), info
