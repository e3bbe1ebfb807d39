"""Symmetric Lanczos with full reorthogonalisation, and Ritz pairs from its tridiagonal."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from nngeo_ops.errors import ConvergenceWarning, InvalidArgumentError, ShapeError

from ._common import check_finite, check_positive_int, resolve_settings, sample_probes
from ._matvec import MatmatOperator, as_square_operator, check_symmetric_if_dense

__all__ = ["LanczosSettings", "lanczos", "lanczos_tridiag", "tridiag_matrix"]

WHICH = ("LA", "SA", "BE")


@dataclass(frozen=True)
class LanczosSettings:
    """Settings of :func:`lanczos` and :func:`lanczos_tridiag`.

    Attributes:
        num_iter: Krylov dimension m; ``None`` means ``min(n, max(2k + 20, 3k))`` in
            :func:`lanczos`.
        reorth_passes: classical Gram–Schmidt passes against all previous Lanczos vectors per
            step (two passes are enough to keep Q orthonormal to working precision).
        tol: a Ritz pair (θ, y) is reported unconverged, with a :class:`ConvergenceWarning`,
            when its residual estimate |β_m s_m| exceeds ``tol·‖T‖``; ``None`` means
            ``sqrt(eps)`` of the dtype.
    """

    num_iter: int | None = None
    reorth_passes: int = 2
    tol: float | None = None

    def __post_init__(self) -> None:
        if self.num_iter is not None:
            check_positive_int(self.num_iter, "num_iter")
        check_positive_int(self.reorth_passes, "reorth_passes", minimum=0)
        if self.tol is not None and not self.tol >= 0:
            raise InvalidArgumentError(f"tol must be >= 0, got {self.tol}")


def tridiag_matrix(alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The symmetric tridiagonal T with diagonal ``alpha`` (..., m) and off-diagonal ``beta``
    (..., m−1); returns (..., m, m)."""
    T = torch.diag_embed(alpha)
    if beta.shape[-1] > 0:
        T = T + torch.diag_embed(beta, offset=1) + torch.diag_embed(beta, offset=-1)
    return T


def _orthogonalise(W: torch.Tensor, Q: torch.Tensor, passes: int) -> torch.Tensor:
    # W: (p, n), Q: (p, n, j). Classical Gram-Schmidt, repeated: "twice is enough".
    for _ in range(passes):
        if Q.shape[-1] == 0:
            break
        W = W - torch.einsum("pnj,pj->pn", Q, torch.einsum("pnj,pn->pj", Q, W))
    return W


def _run_lanczos(
    op: MatmatOperator,
    V0: torch.Tensor,
    m: int,
    passes: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """p independent Lanczos runs driven by one (n, p) product per step.

    Returns alpha (p, m), beta (p, m−1), Q (p, n, m) and the residual norms β_m (p,).
    """
    n, p = V0.shape
    dtype, device = op.dtype, op.device
    eps = torch.finfo(dtype).eps
    Q = torch.zeros(p, n, m, dtype=dtype, device=device)
    alpha = torch.zeros(p, m, dtype=dtype, device=device)
    beta = torch.zeros(p, m, dtype=dtype, device=device)
    norms = torch.linalg.vector_norm(V0, dim=0)
    if bool((norms == 0).any()):
        raise InvalidArgumentError("lanczos: the start vector v0 (or one of its columns) is zero")
    Q[:, :, 0] = (V0 / norms).T
    anorm = torch.zeros(p, dtype=dtype, device=device)
    for j in range(m):
        q = Q[:, :, j]
        W = op.matmat(q.T.contiguous()).T
        a = (q * W).sum(-1)
        check_finite(a, "the Lanczos coefficients (A produced NaN/inf)")
        alpha[:, j] = a
        W = W - a[:, None] * q
        if j > 0:
            W = W - beta[:, j - 1, None] * Q[:, :, j - 1]
        W = _orthogonalise(W, Q[:, :, : j + 1], passes)
        b = torch.linalg.vector_norm(W, dim=-1)
        anorm = torch.maximum(anorm, a.abs() + b + (beta[:, j - 1] if j > 0 else 0))
        beta[:, j] = b
        if j + 1 == m:
            break
        # An invariant subspace was found (β ≈ 0). Rather than stopping, restart with a random
        # direction orthogonal to Q and record β = 0: T becomes block diagonal, its first block
        # keeps the exact Ritz values and quadrature weights, and the later blocks can still find
        # further (e.g. repeated) eigenvalues.
        broken = b <= max(n, 10) * eps * anorm
        if bool(broken.any()):
            nb = int(broken.sum())
            Rnd = sample_probes(
                n, nb, distribution="gaussian", dtype=dtype, device=device, generator=generator
            ).T
            Rnd = _orthogonalise(Rnd, Q[broken, :, : j + 1], max(passes, 2))
            W[broken] = Rnd
            beta[broken, j] = 0
            b = torch.where(broken, torch.linalg.vector_norm(W, dim=-1), b)
        Q[:, :, j + 1] = W / b[:, None]
    return alpha, beta[:, : m - 1], Q, beta[:, m - 1]


def lanczos_tridiag(
    A: object,
    v0: torch.Tensor,
    m: int,
    *,
    generator: torch.Generator | None = None,
    settings: LanczosSettings | None = None,
    **overrides: object,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run m steps of symmetric Lanczos from ``v0``: ``Aᵀ = A``, ``A Q ≈ Q T``.

    Builds an orthonormal basis Q = [q_1 … q_m] of the Krylov space K_m(A, v0) with
    q_1 = v0/‖v0‖ and T = Qᵀ A Q tridiagonal with diagonal α and off-diagonal β
    (A q_j = β_{j−1} q_{j−1} + α_j q_j + β_j q_{j+1}). Every new vector is reorthogonalised
    against all previous ones (``settings.reorth_passes`` Gram–Schmidt passes), so Q stays
    orthonormal and T has no spurious copies of converged eigenvalues. When the space becomes
    invariant (β_j ≈ 0) the run continues from a random vector orthogonal to Q with β_j = 0.

    ``v0`` may hold p start vectors as columns: the p runs then share one (n, p) product per step.

    Args:
        A: symmetric operator (n, n); a plain callable takes its shape/dtype/device from ``v0``.
        v0: start vector(s), shape (n,) or (n, p); need not be normalised.
        m: number of steps, capped at n.
        generator: used only to draw restart vectors after a breakdown.
        settings: :class:`LanczosSettings` (``reorth_passes`` is used here); keyword
            ``overrides`` replace its fields.

    Returns:
        ``(alpha, beta, Q)``: for v0 of shape (n,), shapes (m,), (m−1,), (n, m); for v0 of shape
        (n, p), shapes (p, m), (p, m−1), (p, n, m).
    """
    s = resolve_settings(LanczosSettings, settings, overrides)
    op = as_square_operator(A, like=v0, what="lanczos_tridiag", symmetric=True)
    check_symmetric_if_dense(A, "lanczos_tridiag")
    n = op.shape[0]
    check_positive_int(m, "m")
    if v0.ndim not in (1, 2) or v0.shape[0] != n:
        raise ShapeError(f"v0 must have shape ({n},) or ({n}, p), got {tuple(v0.shape)}")
    V0 = v0.reshape(n, -1).to(dtype=op.dtype, device=op.device)
    alpha, beta, Q, _ = _run_lanczos(op, V0, min(m, n), s.reorth_passes, generator)
    if v0.ndim == 1:
        return alpha[0], beta[0], Q[0]
    return alpha, beta, Q


def _select(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    m = theta.shape[0]
    if which == "LA":
        return torch.arange(m - k, m)
    if which == "SA":
        return torch.arange(k)
    hi = (k + 1) // 2  # ARPACK's convention: the odd one out comes from the high end
    lo = k - hi
    return torch.cat([torch.arange(lo), torch.arange(m - hi, m)])


def lanczos(
    A: object,
    k: int,
    *,
    which: str = "LA",
    num_iter: int | None = None,
    v0: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    settings: LanczosSettings | None = None,
    **overrides: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalisation.

    Runs m = ``num_iter`` Lanczos steps (:func:`lanczos_tridiag`), diagonalises T = S Θ Sᵀ and
    returns Ritz pairs (θ_i, Q s_i). ``which`` picks the ``"LA"`` largest, ``"SA"`` smallest or
    ``"BE"`` both ends (⌈k/2⌉ from the top, ⌊k/2⌋ from the bottom) algebraic eigenvalues. With
    m = n the result equals a dense eigendecomposition up to rounding.

    Args:
        A: symmetric operator (n, n); a plain callable takes its shape/dtype/device from ``v0``.
        k: number of eigenpairs, 1 ≤ k ≤ m.
        which: ``"LA"``, ``"SA"`` or ``"BE"``.
        num_iter: Krylov dimension m (overrides ``settings.num_iter``), capped at n.
        v0: start vector (n,); by default a Gaussian vector from ``generator``.
        generator: for the start vector and breakdown restarts.
        settings: :class:`LanczosSettings`; keyword ``overrides`` (``tol=``,
            ``reorth_passes=``) replace its fields.

    Returns:
        ``(evals, evecs)``: evals (k,) sorted ascending, evecs (n, k) orthonormal columns with
        ``A evecs[:, i] ≈ evals[i] evecs[:, i]``.

    Warns:
        ConvergenceWarning: some selected Ritz pair has residual estimate > tol·‖T‖.
    """
    s = resolve_settings(LanczosSettings, settings, {"num_iter": num_iter, **overrides})
    if which not in WHICH:
        raise InvalidArgumentError(f"which must be one of {WHICH}, got {which!r}")
    op = as_square_operator(A, like=v0, what="lanczos", symmetric=True)
    check_symmetric_if_dense(A, "lanczos")
    n = op.shape[0]
    check_positive_int(k, "k")
    if k > n:
        raise ShapeError(f"lanczos: asked for k={k} eigenpairs of an operator of shape {op.shape}")
    m = min(n, s.num_iter if s.num_iter is not None else max(2 * k + 20, 3 * k))
    if k > m:
        raise InvalidArgumentError(
            f"lanczos: k={k} eigenpairs need num_iter >= k, got num_iter={m}"
        )
    if v0 is None:
        v0 = sample_probes(
            n, 1, distribution="gaussian", dtype=op.dtype, device=op.device, generator=generator
        )
    elif v0.ndim != 1 or v0.shape[0] != n:
        raise ShapeError(f"lanczos: v0 must have shape ({n},), got {tuple(v0.shape)}")
    V0 = v0.reshape(n, 1).to(dtype=op.dtype, device=op.device)
    alpha, beta, Q, beta_last = _run_lanczos(op, V0, m, s.reorth_passes, generator)
    T = tridiag_matrix(alpha[0], beta[0])
    theta, S = torch.linalg.eigh(T)
    idx = _select(theta, k, which).to(theta.device)
    evals = theta[idx]
    evecs = Q[0] @ S[:, idx]
    if m < n:
        tol = s.tol if s.tol is not None else torch.finfo(op.dtype).eps ** 0.5
        resid = (beta_last[0] * S[-1, idx]).abs()
        scale = theta.abs().max().clamp_min(torch.finfo(op.dtype).tiny)
        if bool((resid > tol * scale).any()):
            warnings.warn(
                f"lanczos: {int((resid > tol * scale).sum())} of the {k} Ritz pairs have not "
                f"converged after {m} steps (relative residual up to "
                f"{float(resid.max() / scale):.3g} > tol={tol:.3g}); raise num_iter",
                ConvergenceWarning,
                stacklevel=2,
            )
    return evals, evecs
