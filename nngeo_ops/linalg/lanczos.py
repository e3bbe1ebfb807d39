"""Symmetric Lanczos: the tridiagonalisation behind SLQ, and converged extreme eigenpairs.

:func:`lanczos_tridiag` runs plain Lanczos with full reorthogonalisation (p runs batched, one
(n, p) product per step) and is differentiable: its recurrence never writes in place into a tensor
that autograd needs. :func:`lanczos` returns extreme eigenpairs converged to a tolerance by the
thick-restart (block) Lanczos of :mod:`nngeo_ops.linalg.block_lanczos`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from nngeo_ops.errors import DTypeDeviceError, InvalidArgumentError, NotSymmetricError, ShapeError

from ._common import check_finite, check_positive_int, resolve_settings, sample_probes
from ._matvec import MatmatOperator, as_square_matmat, check_symmetric_if_dense
from .block_lanczos import block_lanczos

__all__ = [
    "LanczosSettings",
    "lanczos",
    "lanczos_tridiag",
    "prepare_symmetric",
    "tridiag_matrix",
]

WHICH = ("LA", "SA", "BE")
LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class LanczosSettings:
    """Settings of :func:`lanczos` and :func:`lanczos_tridiag`.

    Attributes:
        num_iter: the largest basis (Krylov dimension) m before a restart; ``None`` means
            ``min(n, max(2k + 20, 3k, k + 2b))`` in :func:`lanczos`.
        reorth_passes: classical Gram–Schmidt passes against all previous Lanczos vectors per
            step (two passes are enough to keep the basis orthonormal to working precision).
        tol: a Ritz pair (θ, y) is converged when its residual ‖A y − θ y‖ ≤ ``tol·max|θ|``;
            ``None`` means eps^(3/4) of the dtype (1.8e-12 in float64, 6.4e-6 in float32).
        max_restarts: thick restarts before :func:`lanczos` gives up with a
            :class:`ConvergenceWarning` (0: a single Krylov space of dimension m, no restart).
        block_size: b start vectors, one (n, b) product per step (block Lanczos).
    """

    num_iter: int | None = None
    reorth_passes: int = 2
    tol: float | None = None
    max_restarts: int = 100
    block_size: int = 1

    def __post_init__(self) -> None:
        if self.num_iter is not None:
            check_positive_int(self.num_iter, "num_iter")
        check_positive_int(self.reorth_passes, "reorth_passes", minimum=0)
        check_positive_int(self.max_restarts, "max_restarts", minimum=0)
        check_positive_int(self.block_size, "block_size")
        if self.tol is not None and not self.tol >= 0:
            raise InvalidArgumentError(f"tol must be >= 0, got {self.tol}")


def prepare_symmetric(
    A: object, like: torch.Tensor | None, what: str
) -> tuple[MatmatOperator, torch.dtype | None]:
    """Normalise a symmetric operator for the Lanczos family; returns ``(op, low_dtype)``.

    - An object carrying a ``symmetric`` tag set to False (a lazy node) is refused with
      :class:`NotSymmetricError`: its Ritz values would be wrong, not merely inaccurate.
    - A dense tensor is checked for symmetry (O(n²)).
    - half / bfloat16 operators run in float32 (a Krylov recurrence in 8 bits of mantissa loses
      orthogonality within a few steps); ``low_dtype`` is then the dtype to cast results back to.
    """
    tag = getattr(A, "symmetric", None)
    if tag is False and not isinstance(A, (torch.Tensor, MatmatOperator)):
        name = A._str() if hasattr(A, "_str") else type(A).__name__
        raise NotSymmetricError(
            f"{what} needs a symmetric operator, but {name} of shape {tuple(A.shape)} is not "
            "tagged symmetric (its Ritz values would be wrong); build its leaves with "
            "symmetric=True / psd=True if A = Aᵀ, or pass the symmetric part (A + A.T) / 2"
        )
    op = as_square_matmat(A, like=like, what=what, symmetric=True)
    check_symmetric_if_dense(A, what)
    if op.dtype in LOW_PRECISION:
        low = op.dtype

        def upcast(X: torch.Tensor, _op: MatmatOperator = op) -> torch.Tensor:
            return _op.matmat(X.to(low)).to(torch.float32)

        op = MatmatOperator(
            op.shape, torch.float32, op.device, upcast, None, True, f"{op.description} ({low})"
        )
        return op, low
    if not op.dtype.is_floating_point:  # pragma: no cover - as_matmat refuses these already
        raise DTypeDeviceError(f"{what} needs a floating dtype, got {op.dtype}")
    return op, None


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
    rng: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """p independent Lanczos runs driven by one (n, p) product per step.

    Returns alpha (p, m), beta (p, m−1), Q (p, n, m) and the residual norms β_m (p,). Written
    without in-place writes into tensors autograd records (lists, stacked at the end), so that
    a log-determinant or density estimated from it can be differentiated with respect to the
    operator (e.g. its damping).
    """
    n, p = V0.shape
    dtype, device = op.dtype, op.device
    eps = torch.finfo(dtype).eps
    norms = torch.linalg.vector_norm(V0, dim=0)
    if bool((norms == 0).any()):
        raise InvalidArgumentError("lanczos: the start vector v0 (or one of its columns) is zero")
    qs = [(V0 / norms).T]
    alphas: list[torch.Tensor] = []
    betas: list[torch.Tensor] = []
    anorm = torch.zeros(p, dtype=dtype, device=device)
    for j in range(m):
        q = qs[j]
        Q = torch.stack(qs, -1)  # (p, n, j + 1)
        W = op.matmat(q.T.contiguous()).T
        a = (q * W).sum(-1)
        check_finite(a, "the Lanczos coefficients (A produced NaN/inf)")
        alphas.append(a)
        W = W - a[:, None] * q
        if j > 0:
            W = W - betas[j - 1][:, None] * qs[j - 1]
        W = _orthogonalise(W, Q, passes)
        b = torch.linalg.vector_norm(W, dim=-1)
        anorm = torch.maximum(anorm, (a.abs() + b + (betas[j - 1] if j > 0 else 0)).detach())
        if j + 1 == m:
            betas.append(b)
            break
        # An invariant subspace was found (β ≈ 0). Rather than stopping, restart with a random
        # direction orthogonal to Q and record β = 0: T becomes block diagonal, its first block
        # keeps the exact Ritz values and quadrature weights, and the later blocks can still find
        # further (e.g. repeated) eigenvalues.
        broken = b.detach() <= max(n, 10) * eps * anorm
        if bool(broken.any()):
            Rnd = sample_probes(
                n, p, distribution="gaussian", dtype=dtype, device=device, rng=rng
            ).T
            Rnd = _orthogonalise(Rnd, Q, max(passes, 2))
            Rnd = Rnd / torch.linalg.vector_norm(Rnd, dim=-1, keepdim=True)
            b = torch.where(broken, torch.zeros_like(b), b)
            nxt = torch.where(broken[:, None], Rnd, W / torch.where(broken, 1.0, b)[:, None])
        else:
            nxt = W / b[:, None]
        betas.append(b)
        qs.append(nxt)
    alpha = torch.stack(alphas, -1)
    beta = torch.stack(betas, -1)
    return alpha, beta[:, : m - 1], torch.stack(qs, -1), beta[:, m - 1]


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
    op, low = prepare_symmetric(A, v0, "lanczos_tridiag")
    n = op.shape[0]
    check_positive_int(m, "m")
    if v0.ndim not in (1, 2) or v0.shape[0] != n:
        raise ShapeError(f"v0 must have shape ({n},) or ({n}, p), got {tuple(v0.shape)}")
    V0 = v0.reshape(n, -1).to(dtype=op.dtype, device=op.device)
    alpha, beta, Q, _ = _run_lanczos(op, V0, min(m, n), s.reorth_passes, generator)
    if low is not None:
        alpha, beta, Q = alpha.to(low), beta.to(low), Q.to(low)
    if v0.ndim == 1:
        return alpha[0], beta[0], Q[0]
    return alpha, beta, Q


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
    """k extreme eigenpairs of a symmetric operator, converged to ``tol`` by restarted Lanczos.

    Thick-restart Lanczos with full reorthogonalisation (:func:`block_lanczos` with block size
    ``settings.block_size``, 1 by default): a Krylov basis of dimension m = ``num_iter`` is
    built, its Ritz pairs (θ_i, y_i) are extracted, and unless every wanted pair has residual
    ‖A y_i − θ_i y_i‖ ≤ ``tol``·max|θ|, the basis restarts from the wanted Ritz vectors, up to
    ``max_restarts`` times (as ARPACK behind scipy's ``eigsh``). ``which`` picks the ``"LA"``
    largest, ``"SA"`` smallest or ``"BE"`` both ends (⌈k/2⌉ from the top, ⌊k/2⌋ from the
    bottom) algebraic eigenvalues; indefinite operators (Hessians) are fine. With m = n the
    result equals a dense eigendecomposition up to rounding.

    Args:
        A: symmetric operator (n, n); a plain callable takes its shape/dtype/device from ``v0``.
            A node tagged ``symmetric=False`` raises :class:`NotSymmetricError`; half/bfloat16
            operators are run in float32 and the results cast back.
        k: number of eigenpairs, 1 ≤ k ≤ n.
        which: ``"LA"``, ``"SA"`` or ``"BE"``.
        num_iter: basis size m (overrides ``settings.num_iter``), capped at n.
        v0: start vector (n,) (or block (n, b)); by default Gaussian from ``generator``.
        generator: for the start vector and breakdown directions (reproducible results).
        settings: :class:`LanczosSettings`; keyword ``overrides`` (``tol=``, ``max_restarts=``,
            ``block_size=``, ``reorth_passes=``) replace its fields.

    Returns:
        ``(evals, evecs)``: evals (k,) sorted ascending, evecs (n, k) orthonormal columns with
        ``A evecs[:, i] ≈ evals[i] evecs[:, i]``. Differentiable: when A's products carry
        autograd history, evals are the Rayleigh quotients yᵀ A y of the (detached) eigenvectors,
        whose gradient is yᵀ ∂A y. :func:`block_lanczos` also returns residuals and counts.

    Warns:
        ConvergenceWarning: some wanted pair is still above tolerance after ``max_restarts``.
    """
    s = resolve_settings(LanczosSettings, settings, {"num_iter": num_iter, **overrides})
    if which not in WHICH:
        raise InvalidArgumentError(f"which must be one of {WHICH}, got {which!r}")
    if v0 is not None and v0.ndim == 2 and v0.shape[1] != s.block_size:
        s = dataclasses.replace(s, block_size=v0.shape[1])
    res = block_lanczos(A, k, which=which, v0=v0, generator=generator, settings=s)
    return res.eigenvalues, res.eigenvectors
