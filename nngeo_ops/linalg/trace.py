"""Stochastic trace estimators: Girard–Hutchinson, Hutch++ and XTrace.

All three return :class:`Estimate` ``(value, stderr)`` with 0-d tensors, and use only products of
``A`` with (n, k) blocks. ``A`` need not be symmetric: every estimator is unbiased for tr A of any
square A (the variance formulas in the docstrings are stated for symmetric A; for general A
replace A by its symmetric part (A + Aᵀ)/2).
"""

from __future__ import annotations

import torch

from ._common import (
    Estimate,
    check_positive_int,
    refuse_low_precision,
    sample_probes,
    sample_stderr,
)
from ._matvec import MatmatOperator, as_square_matmat

__all__ = ["hutchinson", "hutchpp", "xtrace"]


def _probes(
    op: MatmatOperator, k: int, distribution: str, rng: torch.Generator | None
) -> torch.Tensor:
    return sample_probes(
        op.shape[0],
        k,
        distribution=distribution,
        dtype=op.dtype,
        device=op.device,
        rng=rng,
    )


def _exact_if_affordable(op: MatmatOperator, num_matvecs: int) -> Estimate | None:
    """tr A from n unit-vector products when the budget allows it (then no estimate beats it)."""
    n = op.shape[0]
    if num_matvecs < n:
        return None
    eye = torch.eye(n, dtype=op.dtype, device=op.device)
    value = torch.diagonal(op.matmat(eye)).sum()
    return Estimate(value, torch.zeros_like(value))


def _quad_samples(op: MatmatOperator, Z: torch.Tensor, batch_size: int | None) -> torch.Tensor:
    """z_iᵀ A z_i for every column of Z, applying A to at most ``batch_size`` columns at once."""
    k = Z.shape[1]
    step = k if batch_size is None else batch_size
    parts = [(Z[:, i : i + step] * op.matmat(Z[:, i : i + step])).sum(0) for i in range(0, k, step)]
    return torch.cat(parts)


def hutchinson(
    A: object,
    num_probes: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
) -> Estimate:
    """Girard–Hutchinson trace estimate  t = (1/m) Σ_i z_iᵀ A z_i  with E[z zᵀ] = I.

    Unbiased. For symmetric A the variance is 2(‖A‖_F² − Σ_i A_ii²)/m with Rademacher probes and
    2‖A‖_F²/m with Gaussian probes. Costs m products.

    Args:
        A: square operator (n, n) (a plain callable needs :func:`as_matmat` with shape=).
        num_probes: m ≥ 1.
        distribution: ``"rademacher"`` or ``"gaussian"``.
        generator: source of the probes.
        batch_size: apply A to at most this many probes at once (memory), default all at once.

    Returns:
        ``Estimate(value, stderr)``: 0-d tensors; stderr = std(z_iᵀAz_i)/√m (nan for m = 1).
    """
    check_positive_int(num_probes, "num_probes")
    if batch_size is not None:
        check_positive_int(batch_size, "batch_size")
    op = as_square_matmat(A, what="hutchinson")
    refuse_low_precision(op.dtype, "hutchinson")
    Z = _probes(op, num_probes, distribution, generator)
    samples = _quad_samples(op, Z, batch_size)
    return Estimate(samples.mean(), sample_stderr(samples))


def hutchpp(
    A: object,
    num_matvecs: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> Estimate:
    """Hutch++ trace estimate (Meyer, Musco, Musco & Woodruff, 2021).

    With s = ⌊m/3⌋ sketch vectors S and g = m − 2s Hutchinson probes G:
    Q = orth(A S) (n, s), and

        t = tr(Qᵀ A Q) + (1/g) Σ_i g_iᵀ (I − QQᵀ) A (I − QQᵀ) g_i,

    exact for the part of A captured by Q and Hutchinson on the deflated rest. Unbiased (the
    Hutchinson part is unbiased given Q, and tr A = tr(QᵀAQ) + tr((I−QQᵀ)A(I−QQᵀ)) for any
    orthonormal Q); exact when rank A ≤ s. Costs m products (s for A S, s for A Q, g for the rest).
    When m ≥ n the exact trace from n unit-vector products is returned instead (stderr 0).

    Args:
        A: square operator (n, n) (a plain callable needs :func:`as_matmat` with shape=).
        num_matvecs: m ≥ 3.
        distribution: of the sketch and Hutchinson probes.
        generator: source of the probes.

    Returns:
        ``Estimate(value, stderr)``: 0-d tensors; stderr is the standard error of the Hutchinson
        part given Q (std of its samples / √g); 0 when A is captured exactly.
    """
    check_positive_int(num_matvecs, "num_matvecs", minimum=3)
    op = as_square_matmat(A, what="hutchpp")
    refuse_low_precision(op.dtype, "hutchpp")
    exact = _exact_if_affordable(op, num_matvecs)
    if exact is not None:
        return exact
    s = num_matvecs // 3
    g = num_matvecs - 2 * s
    S = _probes(op, s, distribution, generator)
    Q, _ = torch.linalg.qr(op.matmat(S))
    t_low = (Q * op.matmat(Q)).sum()
    G = _probes(op, g, distribution, generator)
    G = G - Q @ (Q.mT @ G)
    AG = op.matmat(G)
    samples = (G * (AG - Q @ (Q.mT @ AG))).sum(0)
    return Estimate(t_low + samples.mean(), sample_stderr(samples))


def xtrace(
    A: object,
    num_matvecs: int,
    *,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> Estimate:
    """XTrace estimate (Epperly, Tropp & Webber, SIMAX 2024): exchangeable Hutch++.

    With s = ⌊m/2⌋ probes Ω = [ω_1 … ω_s], Y = AΩ = QR, let Q_(i) be an orthonormal basis of
    range(Y without column i) and P_(i) = Q_(i)Q_(i)ᵀ. Each probe gives the Hutch++-type estimate

        t_i = tr(Q_(i)ᵀ A Q_(i)) + ω_iᵀ (I − P_(i)) A (I − P_(i)) ω_i,

    which is unbiased because ω_i is independent of Q_(i); XTrace returns their mean. Using
    Q_(i)Q_(i)ᵀ = Q(I − σ_iσ_iᵀ)Qᵀ, where σ_i is the normalised i-th column of R⁻ᵀ, all t_i come
    from the s products AΩ and s products AQ (m products in all) without further matvecs.
    Exact when rank A < s. When m ≥ n the exact trace from n unit-vector products is returned
    instead (stderr 0).

    Args:
        A: square operator (n, n) (a plain callable needs :func:`as_matmat` with shape=).
        num_matvecs: m ≥ 4 (an odd m uses m − 1 products).
        distribution: of the probes.
        generator: source of the probes.

    Returns:
        ``Estimate(value, stderr)``: 0-d tensors; stderr = std(t_i)/√s, the error estimate of
        the XTrace paper.
    """
    check_positive_int(num_matvecs, "num_matvecs", minimum=4)
    op = as_square_matmat(A, what="xtrace")
    refuse_low_precision(op.dtype, "xtrace")
    exact = _exact_if_affordable(op, num_matvecs)
    if exact is not None:
        return exact
    s = num_matvecs // 2
    W = _probes(op, s, distribution, generator)
    Y = op.matmat(W)
    Q, R = torch.linalg.qr(Y)
    Z = op.matmat(Q)
    H = Q.mT @ Z  # QᵀAQ
    dtype = R.dtype
    # A rank-deficient Y (rank A < s) makes R singular; lifting its tiny pivots to eps·max keeps
    # R⁻ᵀ finite, and the σ_i it yields then point along the spurious directions of Q, which is
    # exactly what makes the estimate exact for low-rank A.
    d = torch.diagonal(R)
    scale = d.abs().max()
    if not bool(scale > 0):
        # Y = 0: A annihilates the probes; with s = n it is the zero matrix, else every term is
        # zero anyway. Report the (exact) zero estimate of the data at hand.
        zero = torch.zeros((), dtype=dtype, device=R.device)
        return Estimate(zero, zero.clone())
    floor = torch.finfo(dtype).eps * scale
    d_safe = torch.where(d.abs() < floor, torch.where(d < 0, -floor, floor), d)
    R = R - torch.diag_embed(d) + torch.diag_embed(d_safe)
    eye = torch.eye(s, dtype=dtype, device=R.device)
    Rinv_T = torch.linalg.solve_triangular(R, eye, upper=True).mT
    Sig = Rinv_T / torch.linalg.vector_norm(Rinv_T, dim=0, keepdim=True)
    # tr(Q_(i)ᵀ A Q_(i)) = tr H − σ_iᵀ H σ_i
    t_proj = torch.trace(H) - (Sig * (H @ Sig)).sum(0)
    # u_i = (I − P_(i)) ω_i = ω_i − Q d_i with d_i = (I − σ_iσ_iᵀ) Qᵀω_i, so
    # u_iᵀ A u_i = ω_iᵀAω_i − (Zᵀω_i)ᵀd_i − d_iᵀ(QᵀAω_i) + d_iᵀ H d_i, and QᵀAω_i = QᵀY_i = R_i.
    C = Q.mT @ W
    D = C - Sig * (Sig * C).sum(0, keepdim=True)
    QtY = Q.mT @ Y
    t_res = (W * Y).sum(0) - ((Z.mT @ W) * D).sum(0) - (D * QtY).sum(0) + (D * (H @ D)).sum(0)
    ests = t_proj + t_res
    return Estimate(ests.mean(), sample_stderr(ests))
