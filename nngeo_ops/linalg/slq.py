"""Stochastic Lanczos quadrature: tr f(A), log det A and spectral densities of symmetric A.

For a probe z and the Lanczos tridiagonal T = S Θ Sᵀ started from z/‖z‖, Gauss quadrature gives
zᵀ f(A) z ≈ ‖z‖² Σ_j τ_j f(θ_j) with nodes θ_j (Ritz values) and weights τ_j = S_{1j}² (they sum
to 1). Averaging over independent probes with E[z zᵀ] = I estimates tr f(A) (Ubaru, Chen & Saad,
2017).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nngeo_ops.errors import InvalidArgumentError, NotPSDError, ShapeError

from ._common import Estimate, check_positive_int, resolve_settings, sample_probes, sample_stderr
from .lanczos import _run_lanczos, prepare_symmetric, tridiag_matrix

__all__ = ["SLQSettings", "SLQResult", "slq", "slq_logdet", "spectral_density"]


@dataclass(frozen=True)
class SLQSettings:
    """Settings of :func:`slq` and the functions built on it.

    Attributes:
        num_probes: number of independent probe vectors p.
        num_iter: Lanczos steps per probe m (capped at n); m nodes per probe.
        distribution: ``"rademacher"`` (‖z‖² = n, lower variance) or ``"gaussian"``.
        reorth_passes: Gram–Schmidt passes per Lanczos step.
    """

    num_probes: int = 16
    num_iter: int = 32
    distribution: str = "rademacher"
    reorth_passes: int = 2

    def __post_init__(self) -> None:
        check_positive_int(self.num_probes, "num_probes")
        check_positive_int(self.num_iter, "num_iter")
        check_positive_int(self.reorth_passes, "reorth_passes", minimum=0)


@dataclass
class SLQResult:
    """Quadrature rules from :func:`slq`, one per probe.

    Attributes:
        nodes: (p, m) Ritz values θ (the quadrature nodes), ascending per probe.
        weights: (p, m) weights τ ≥ 0, each row summing to 1.
        probe_norms_sq: (p,) ‖z_i‖² of the probes (n for Rademacher probes).
        n: the operator's dimension.
    """

    nodes: torch.Tensor
    weights: torch.Tensor
    probe_norms_sq: torch.Tensor
    n: int

    def samples(self, f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """Per-probe estimates ‖z_i‖² Σ_j τ_ij f(θ_ij) of tr f(A); shape (p,)."""
        return self.probe_norms_sq * (self.weights * f(self.nodes)).sum(-1)

    def estimate(self, f: Callable[[torch.Tensor], torch.Tensor]) -> Estimate:
        """``Estimate(value, stderr)`` of tr f(A): the mean of :meth:`samples` and its standard
        error (``f`` must be elementwise on tensors, e.g. ``torch.log``)."""
        smp = self.samples(f)
        return Estimate(smp.mean(), sample_stderr(smp))

    def density(
        self,
        grid: torch.Tensor,
        sigma: float,
        kernel: str = "gaussian",
        *,
        per_probe: bool = False,
    ) -> torch.Tensor:
        """Smoothed spectral density on ``grid`` (linear axis).

        φ(t) = (1/p) Σ_i Σ_j τ_ij K_σ(t − θ_ij), an estimate of (1/n) Σ_l K_σ(t − λ_l), with
        ``kernel`` ``"gaussian"`` (K_σ = N(0, σ²)) or ``"lorentzian"``
        (K_σ(x) = σ / (π (x² + σ²)), heavy tails). It integrates to 1 over the real line (each
        probe's weights sum to 1). Returns the shape of ``grid``, or ``(p, *grid.shape)`` with
        ``per_probe=True`` (the estimate of each probe, whose spread gives the error).
        """
        g = torch.as_tensor(grid, dtype=self.nodes.dtype, device=self.nodes.device)
        kern = broadening_kernel(g.reshape(-1, 1, 1) - self.nodes, sigma, kernel)  # (g, p, m)
        per = (kern * self.weights).sum(-1)  # (g, p)
        if per_probe:
            return per.mT.reshape(-1, *g.shape)
        return per.mean(-1).reshape(g.shape)


KERNELS = ("gaussian", "lorentzian")


def broadening_kernel(x: torch.Tensor, sigma: float, kernel: str = "gaussian") -> torch.Tensor:
    """The broadening K_σ(x) of a spectral density: ``"gaussian"`` exp(−x²/2σ²)/(σ√(2π)) or
    ``"lorentzian"`` σ/(π(x² + σ²)); both integrate to 1 over the real line."""
    if not (isinstance(sigma, (int, float)) and math.isfinite(sigma) and sigma > 0):
        raise InvalidArgumentError(f"sigma must be a finite number > 0, got {sigma!r}")
    if kernel == "gaussian":
        return torch.exp(-0.5 * (x / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
    if kernel == "lorentzian":
        return (sigma / math.pi) / (x * x + sigma * sigma)
    raise InvalidArgumentError(f"kernel must be one of {KERNELS}, got {kernel!r}")


def slq(
    A: object,
    *,
    num_probes: int | None = None,
    num_iter: int | None = None,
    generator: torch.Generator | None = None,
    distribution: str | None = None,
    settings: SLQSettings | None = None,
    **overrides: object,
) -> SLQResult:
    """Stochastic Lanczos quadrature rules of a symmetric operator.

    Draws p probes z_i (``distribution``), runs m Lanczos steps from each (all p runs share one
    (n, p) product per step, with full reorthogonalisation) and returns the Gauss quadrature rules
    (θ_ij, τ_ij) such that z_iᵀ f(A) z_i ≈ ‖z_i‖² Σ_j τ_ij f(θ_ij). Costs p·m products.

    The weights are the squared first components of the tridiagonal's eigenvectors,
    τ_ij = (S_i)_{1j}². The recurrence is differentiable (no in-place writes into tensors autograd
    records), so ``slq_logdet(A(δ))`` can be differentiated in δ. A node tagged
    ``symmetric=False`` raises :class:`NotSymmetricError`; half/bfloat16 operators run in float32
    and the rules are cast back.

    Args:
        A: symmetric operator (n, n) (a plain callable needs :func:`as_matmat` with shape=).
        num_probes, num_iter, distribution: override the fields of ``settings`` (a
            :class:`SLQSettings`), as do any other keyword ``overrides`` (``reorth_passes=``).
        generator: source of the probes (and of restart vectors after a Lanczos breakdown).

    Returns:
        An :class:`SLQResult`.
    """
    s = resolve_settings(
        SLQSettings,
        settings,
        {
            "num_probes": num_probes,
            "num_iter": num_iter,
            "distribution": distribution,
            **overrides,
        },
    )
    op, low = prepare_symmetric(A, None, "slq")
    n = op.shape[0]
    if n == 0:
        raise ShapeError("slq: the operator is empty (shape (0, 0))")
    Z = sample_probes(
        n,
        s.num_probes,
        distribution=s.distribution,
        dtype=op.dtype,
        device=op.device,
        rng=generator,
    )
    norms_sq = (Z * Z).sum(0)
    alpha, beta, _, _ = _run_lanczos(op, Z, min(s.num_iter, n), s.reorth_passes, generator)
    theta, S = torch.linalg.eigh(tridiag_matrix(alpha, beta))
    weights = S[:, 0, :] ** 2
    if low is not None:
        theta, weights, norms_sq = theta.to(low), weights.to(low), norms_sq.to(low)
    return SLQResult(nodes=theta, weights=weights, probe_norms_sq=norms_sq, n=n)


def slq_logdet(
    A: object,
    *,
    num_probes: int | None = None,
    num_iter: int | None = None,
    generator: torch.Generator | None = None,
    distribution: str | None = None,
    settings: SLQSettings | None = None,
    **overrides: object,
) -> Estimate:
    """Estimate log det A = tr log A of a symmetric positive definite operator by SLQ.

    Arguments as for :func:`slq`. The standard error covers the probe (Monte Carlo) error only;
    the quadrature error is negligible once ``num_iter`` exceeds a few times √cond(A).

    Returns:
        ``Estimate(value, stderr)`` with 0-d tensors.

    Raises:
        NotPSDError: a Ritz value θ ≤ 0 was found; Ritz values lie within the spectrum, so A is
            not positive definite.
    """
    res = slq(
        A,
        num_probes=num_probes,
        num_iter=num_iter,
        generator=generator,
        distribution=distribution,
        settings=settings,
        **overrides,
    )
    lo = res.nodes.min()
    if not bool(lo > 0):
        raise NotPSDError(
            f"slq_logdet needs a positive definite operator, but Lanczos found the Ritz value "
            f"{float(lo):.3g} <= 0; add damping (A + λI) or estimate log|det| another way"
        )
    return res.estimate(torch.log)


def spectral_density(
    A: object,
    grid: torch.Tensor,
    *,
    sigma: float,
    kernel: str = "gaussian",
    num_probes: int | None = None,
    num_iter: int | None = None,
    generator: torch.Generator | None = None,
    distribution: str | None = None,
    settings: SLQSettings | None = None,
    **overrides: object,
) -> torch.Tensor:
    """Smoothed spectral density of a symmetric operator, evaluated on ``grid``.

    Estimates φ(t) = (1/n) Σ_l K_σ(t − λ_l) (the eigenvalue histogram convolved with a Gaussian
    or Lorentzian ``kernel`` of width ``sigma``) by SLQ, see :meth:`SLQResult.density`. The
    result integrates to 1 when the grid covers the spectrum with a margin of a few σ.
    For the estimate together with its spread across probes, a default grid (linear or
    logarithmic) and the quadrature rules, use :func:`nngeo_ops.linalg.estimate_density`.

    Returns:
        A tensor of the shape of ``grid`` (values of the density, same dtype as A).
    """
    res = slq(
        A,
        num_probes=num_probes,
        num_iter=num_iter,
        generator=generator,
        distribution=distribution,
        settings=settings,
        **overrides,
    )
    return res.density(grid, sigma, kernel)
