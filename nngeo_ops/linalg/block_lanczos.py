"""Thick-restart block Lanczos: extreme eigenpairs of a symmetric operator to a tolerance.

The algorithm keeps a basis V (n × j) with orthonormal columns, the products AV and the projected
matrix H = Vᵀ A V, and maintains the Krylov decomposition

    A V = V H + F E_lastᵀ,

where F (n × b) is the residual of the last block of b columns. Each step orthonormalises F
against V (full reorthogonalisation, repeated Gram–Schmidt) into the next block W and spends one
(n, b) product on A W. When V has m columns, the Ritz pairs (θ_i, V s_i) of H = S Θ Sᵀ have
residuals ‖A y_i − θ_i y_i‖ = ‖F S[last b rows, i]‖, read off without any product. Unconverged
runs restart *thick* (Wu & Simon, 2000; Stathopoulos & Saad, 2007): V is replaced by the ``keep``
wanted Ritz vectors Y = V S_keep, AV by AV S_keep (no new products), H by diag(Θ_keep), and the
expansion continues from F, which keeps the decomposition above exact. With b = 1 this is the
thick-restart Lanczos equivalent to ARPACK's implicitly restarted Lanczos (behind scipy's
``eigsh``); with b > 1 the k wanted pairs cost about k/b batched products per sweep instead of k
separate runs.

The iteration runs on detached products. When A's products carry autograd history, the returned
eigenvalues are re-evaluated as Rayleigh quotients yᵀ A y with y detached (one more product), whose
gradient is the Hellmann–Feynman derivative yᵀ (∂A) y of a simple eigenvalue.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from nngeo_ops.errors import ConvergenceWarning, InvalidArgumentError, ShapeError

from ._common import check_finite, check_positive_int, sample_probes
from ._matvec import MatmatOperator

__all__ = ["LanczosResult", "block_lanczos", "thick_restart_lanczos", "select_ritz"]

WHICH = ("LA", "SA", "BE")


class LanczosResult(NamedTuple):
    """Eigenpairs from :func:`block_lanczos` and how they were obtained.

    Attributes:
        eigenvalues: (k,) ascending.
        eigenvectors: (n, k) orthonormal columns, ``A y_i ≈ λ_i y_i``.
        residuals: (k,) residual norms ‖A y_i − λ_i y_i‖ (from the Krylov decomposition).
        converged: (k,) bool, ``residuals ≤ tol · scale``.
        scale: the estimate of ‖A‖ the tolerance is relative to (largest ``|Ritz value|`` seen).
        restarts: number of thick restarts performed.
        num_matvecs: number of operator-vector products spent (columns of all block products).
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: torch.Tensor
    scale: float
    restarts: int
    num_matvecs: int


def select_ritz(theta: torch.Tensor, k: int, which: str) -> torch.Tensor:
    """Indices (ascending) of the k wanted values among ascending ``theta``.

    ``"LA"``: the k largest; ``"SA"``: the k smallest; ``"BE"``: ⌈k/2⌉ from the top and ⌊k/2⌋
    from the bottom (ARPACK's convention: the odd one out comes from the high end).
    """
    m = theta.shape[0]
    dev = theta.device
    if which == "LA":
        return torch.arange(m - k, m, device=dev)
    if which == "SA":
        return torch.arange(k, device=dev)
    hi = (k + 1) // 2
    return torch.cat([torch.arange(k - hi, device=dev), torch.arange(m - hi, m, device=dev)])


def _project_out(W: torch.Tensor, V: torch.Tensor, passes: int) -> torch.Tensor:
    # Classical Gram-Schmidt repeated `passes` times ("twice is enough").
    for _ in range(passes):
        if V.shape[1] == 0:
            break
        W = W - V @ (V.mT @ W)
    return W


def _orthonormal_block(
    F: torch.Tensor,
    V: torch.Tensor,
    width: int,
    thresh: float,
    passes: int,
    rng: torch.Generator | None,
) -> torch.Tensor:
    """An orthonormal (n, width) block spanning F's part outside V, filled with random directions
    where F has (numerically) none: after a breakdown (an invariant subspace, e.g. a repeated
    eigenvalue) the run goes on in a fresh direction instead of stopping."""
    n = F.shape[0]
    cols: list[torch.Tensor] = []
    for i in range(width):
        basis = torch.cat([V, torch.stack(cols, 1)], 1) if cols else V
        if basis.shape[1] >= n:
            break
        c = _project_out(F[:, i : i + 1], basis, passes)[:, 0] if i < F.shape[1] else None
        if c is None or not float(c.norm()) > thresh:
            # a random unit vector keeps a fair part of its norm outside a basis of dim < n
            for _ in range(5):
                c = sample_probes(
                    n,
                    1,
                    distribution="gaussian",
                    dtype=F.dtype,
                    device=F.device,
                    rng=rng,
                )[:, 0]
                c = _project_out((c / c.norm())[:, None], basis, max(passes, 2))[:, 0]
                if float(c.norm()) > 1e-3:
                    break
        cols.append(c / c.norm())
    return torch.stack(cols, 1) if cols else F[:, :0]


def thick_restart_lanczos(
    op: MatmatOperator,
    X0: torch.Tensor,
    k: int,
    *,
    which: str,
    m: int,
    tol: float,
    max_restarts: int,
    reorth_passes: int,
    rng: torch.Generator | None,
    progress: object = None,
) -> LanczosResult:
    """The restarted block iteration of the module docstring, on a normalised operator.

    ``X0`` (n, b) holds the b start vectors (b is the block size); ``m`` the largest basis,
    ``k ≤ m − b`` unless m = n. ``progress`` is an optional tqdm-like bar updated per restart.
    """
    n, b = X0.shape
    dtype, device = op.dtype, op.device
    eps = torch.finfo(dtype).eps
    keep = max(k, min(k + (m - k) // 2, m - b))
    # every block after the kept vectors must be b wide: a narrower block would take only part of
    # the previous residual F, and the rest would fall outside the decomposition A V = V H + F Eᵀ
    keep = m - b * ((m - keep) // b) if m < n else keep
    needs_grad = False
    num_mv = 0

    def product(W: torch.Tensor) -> torch.Tensor:
        nonlocal needs_grad, num_mv
        Z = op.matmat(W.contiguous())
        num_mv += W.shape[1]
        needs_grad = needs_grad or Z.requires_grad
        Z = Z.detach()
        check_finite(Z, "a product of the operator (A produced NaN/inf)")
        return Z

    X0 = X0.detach()
    if bool((torch.linalg.vector_norm(X0, dim=0) == 0).any()):
        raise InvalidArgumentError("lanczos: the start vector v0 (or one of its columns) is zero")
    V = torch.zeros(n, 0, dtype=dtype, device=device)
    V = _orthonormal_block(X0, V, min(b, n), 0.0, reorth_passes, rng)
    AV = product(V)
    H = V.mT @ AV
    H = (H + H.mT) / 2
    last = V.shape[1]  # width of the last block
    pending = None  # after a restart, the residual F the next block must come from
    restarts = 0
    while True:
        # ---- expand the basis to m columns
        while V.shape[1] + b <= m or (m == n and V.shape[1] < n):
            if pending is None:
                F = _project_out(AV[:, -last:] - V @ H[:, -last:], V, reorth_passes)
            else:
                F, pending = pending, None
            anorm = float(H.abs().max()) if H.numel() else 0.0
            W = _orthonormal_block(
                F,
                V,
                min(b, n - V.shape[1]),
                max(n, 10) * eps * max(anorm, 1e-300),
                reorth_passes,
                rng,
            )
            if W.shape[1] == 0:
                break
            AW = product(W)
            j = V.shape[1]
            V = torch.cat([V, W], 1)
            C = V.mT @ AW  # (j + w, w): the new block columns of H = Vᵀ A V
            top, corner = C[:j], (C[j:] + C[j:].mT) / 2
            H = torch.cat([torch.cat([H, top], 1), torch.cat([top.mT, corner], 1)], 0)
            AV, last = torch.cat([AV, AW], 1), W.shape[1]
        # ---- Rayleigh-Ritz; residuals from the decomposition A V = V H + F E_lastᵀ
        check_finite(H, "the projected matrix Vᵀ A V")
        theta, S = torch.linalg.eigh(H)
        if V.shape[1] < n:
            F = _project_out(AV[:, -last:] - V @ H[:, -last:], V, 1)
        else:
            F = torch.zeros(n, last, dtype=dtype, device=device)
        kk = min(k, theta.shape[0])
        idx = select_ritz(theta, kk, which)
        scale = max(float(theta.abs().max()), torch.finfo(dtype).tiny)
        resid = torch.linalg.vector_norm(F @ S[-last:, idx], dim=0)
        converged = resid <= tol * scale
        done = bool(converged.all()) or V.shape[1] >= n
        if progress is not None:
            progress.update(1)
            progress.set_postfix(unconverged=int((~converged).sum()))
        if done or restarts >= max_restarts:
            break
        # ---- thick restart: keep the wanted Ritz vectors (and more from the same end). Then
        # A Y = Y Θ + F S[last rows, keep], so the decomposition holds with F as the residual.
        kidx = select_ritz(theta, min(keep, theta.shape[0] - 1), which)
        V, AV, H = V @ S[:, kidx], AV @ S[:, kidx], torch.diag(theta[kidx])
        pending = F
        restarts += 1
    evecs = V @ S[:, idx]
    evals = theta[idx]
    if not done:
        warnings.warn(
            f"lanczos: {int((~converged).sum())} of the {kk} wanted Ritz pairs have not converged "
            f"after {restarts} restarts of a {m}-dimensional basis (relative residual up to "
            f"{float(resid.max()) / scale:.3g} > tol={tol:.3g}); raise num_iter (the basis size) "
            "or max_restarts",
            ConvergenceWarning,
            stacklevel=3,
        )
    if needs_grad and torch.is_grad_enabled():
        # Hellmann-Feynman: d(yᵀAy) = yᵀ dA y for a fixed unit eigenvector y.
        Z = op.matmat(evecs.contiguous())
        num_mv += evecs.shape[1]
        evals = (evecs * Z).sum(0)
    return LanczosResult(evals, evecs, resid, converged, scale, restarts, num_mv)


def default_basis_size(n: int, k: int, b: int) -> int:
    """ARPACK-like default: about twice the wanted count plus slack, at least k + 2b, at most n."""
    return min(n, max(2 * k + 20, 3 * k, k + 2 * b))


def block_lanczos(
    A: object,
    k: int,
    *,
    which: str = "LA",
    block_size: int | None = None,
    num_iter: int | None = None,
    v0: torch.Tensor | None = None,
    tol: float | None = None,
    max_restarts: int | None = None,
    generator: torch.Generator | None = None,
    progress: bool | None = False,
    settings: object = None,
) -> LanczosResult:
    """k extreme eigenpairs of a symmetric operator by thick-restart block Lanczos.

    See the module docstring for the algorithm. One step costs one (n, b) product and a full
    reorthogonalisation (O(n·m·b)); a restart costs O(n·m·keep) and no product.

    Args:
        A: symmetric operator (n, n): a tensor, a node tagged symmetric, a
            :class:`~nngeo_ops.linalg.MatmatOperator`, or a callable with ``v0`` giving the shape.
        k: number of eigenpairs, 1 ≤ k ≤ n.
        which: ``"LA"`` largest, ``"SA"`` smallest, ``"BE"`` both ends (⌈k/2⌉ on top).
        block_size: b, columns per product (default: ``settings.block_size``, else 1); the
            start block is ``v0`` when it is (n, b), else Gaussian vectors from ``generator``.
        num_iter: the basis size m before a restart (default :func:`default_basis_size`).
        v0: start vector (n,) or block (n, b).
        tol: a pair is converged when ‖A y − θ y‖ ≤ tol·max|θ| (default eps^(3/4) of the dtype:
            1.8e-12 in float64, 6.4e-6 in float32, of the operator's own dtype for half/bfloat16;
            the eigenvalue error is at most the residual, and about residual²/gap).
        max_restarts: restarts before giving up with a ConvergenceWarning (default 100).
        generator: for the start block and breakdown directions: results are reproducible.
        progress: show a tqdm bar (one tick per restart); None shows it on a terminal only.
        settings: a :class:`~nngeo_ops.linalg.LanczosSettings`; explicit keywords win.

    Returns:
        A :class:`LanczosResult` (eigenvalues ascending). half/bfloat16 operators are run in
        float32 and the results cast back.
    """
    from .lanczos import LanczosSettings, prepare_symmetric  # lanczos imports this module

    s = settings if settings is not None else LanczosSettings()
    if not isinstance(s, LanczosSettings):
        raise InvalidArgumentError(f"settings must be a LanczosSettings, got {type(s).__name__}")
    if which not in WHICH:
        raise InvalidArgumentError(f"which must be one of {WHICH}, got {which!r}")
    op, low = prepare_symmetric(A, v0, "block_lanczos")
    n = op.shape[0]
    check_positive_int(k, "k")
    if k > n:
        raise ShapeError(f"lanczos: asked for k={k} eigenpairs of an operator of shape {op.shape}")
    b = block_size if block_size is not None else s.block_size
    if v0 is not None and v0.ndim == 2 and block_size is None:
        b = v0.shape[1]
    check_positive_int(b, "block_size")
    b = min(b, n)
    m = num_iter if num_iter is not None else s.num_iter
    m = min(n, m if m is not None else default_basis_size(n, k, b))
    if m < n and k > m - b:
        raise InvalidArgumentError(
            f"lanczos: k={k} eigenpairs with block size {b} need num_iter >= k + b = {k + b}, "
            f"got num_iter={m}; raise num_iter"
        )
    if v0 is None:
        X0 = sample_probes(
            n, b, distribution="gaussian", dtype=op.dtype, device=op.device, rng=generator
        )
    else:
        if v0.ndim not in (1, 2) or v0.shape[0] != n or (v0.ndim == 2 and v0.shape[1] != b):
            want = f"({n},)" if b == 1 else f"({n}, {b})"
            raise ShapeError(f"lanczos: v0 must have shape {want}, got {tuple(v0.shape)}")
        X0 = v0.reshape(n, -1).to(dtype=op.dtype, device=op.device)
    # the products of a half-precision operator are only accurate to its own eps
    eps = torch.finfo(low if low is not None else op.dtype).eps
    tol = tol if tol is not None else (s.tol if s.tol is not None else eps**0.75)
    restarts = max_restarts if max_restarts is not None else s.max_restarts
    bar = None
    if progress is not False:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=restarts + 1,
            desc="lanczos restarts",
            disable=None if progress is None else not progress,
            leave=False,
        )
    try:
        res = thick_restart_lanczos(
            op,
            X0,
            k,
            which=which,
            m=m,
            tol=tol,
            max_restarts=restarts,
            reorth_passes=s.reorth_passes,
            rng=generator,
            progress=bar,
        )
    finally:
        if bar is not None:
            bar.close()
    if low is not None:
        res = res._replace(
            eigenvalues=res.eigenvalues.to(low), eigenvectors=res.eigenvectors.to(low)
        )
    return res
